"""Offline, deterministic prompt parsing for the G-Refine AQ-Map (g-refine.txt section 3.2, eq. 4, Algorithm 1).

Pipeline (no ComfyUI import, no network, no nltk data packages):

1. :func:`strip_emphasis` removes ComfyUI prompt-weighting syntax and records per-span weights.
2. :func:`tokenize` splits the plain text into words with character offsets; :func:`tag_words` gives Penn tags
   (TextBlob's pattern tagger, offline and deterministic; swap that one function for a better tagger).
3. :func:`build_tree` cuts the words into segments at ``, ; | . ! ?`` (the dot of an abbreviation such as "Mr." or
   "U.S." belongs to its word, :data:`ABBREVIATIONS`, and ends nothing) and chunks each segment with the cascaded
   ``nltk.RegexpParser`` grammar :data:`GRAMMAR`. Tree shape: ``S -> SEG+ -> chunks``; leaves are
   ``(word, tag)`` pairs in prompt order (leaf ``i`` of the tree is ``ParsedPrompt.words[i]``).
4. :func:`compute_clusters` (eq. 4) groups every word around its nearest noun; :func:`phrase_ancestors`
   (Algorithm 1) gives every phrase an ancestor phrase.

Project decisions (documented here once, referred to below):

- Cluster centres are nouns (NN, NNS, NNP, NNPS, plus FW). A run of adjacent nouns under the same parent is a
  compound ("tennis ball", "Taylor Swift"): its last noun is the centre and the others join it.
- Every other word joins a centre (determiners, numbers, adjectives, adverbs, verbs, prepositions, relative
  pronouns, conjunctions inside a noun phrase such as "black and white cat"), except punctuation, symbols
  (tag SYM: emoji, ``embedding:name``, ``/``) and the conjunction that links two coordinated phrases (a CC whose
  parent is a COORD node): "a cat and a dog" gives "a cat" and "a dog", not "a cat and".
- Words never join across segments (the lowest common ancestor may not be the root ``S``); a segment without a
  noun ("highly detailed") contributes no phrase.
- A node's cluster (Algorithm 1) is that of its head noun: a leaf's head is itself if it is a centre; a verb
  phrase's (VP) head is the centre its verb joined in eq. 4 (its object when it has one, else the noun it describes,
  by eq. 4's left tie rule), so prepositional phrases under a verb ("sitting on a table next to a vase") hang from
  the noun the verb describes, not from the first of them; any other subtree's head is its last centre among its
  direct leaves, else the head of its first child subtree. S, SEG and COORD nodes have no head, so segments and
  coordinated phrases are roots.
- "next to", "close to", "adjacent to", "prior to" are one preposition: the first word is retagged IN, and a PP may
  start with several prepositions ("out of the box").
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import nltk

logger = logging.getLogger(__name__)

NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS", "FW"})
PUNCT_TAGS = frozenset({",", ".", ":", "(", ")", '"', "``", "''", "#", "$", "SYM"})
SEGMENT_TOKENS = frozenset({",", ";", "|", ".", "!", "?"})
HEADLESS_LABELS = frozenset({"S", "SEG", "COORD"})
EMPHASIS_UP = 1.1  # ComfyUI: "(text)" multiplies by 1.1, "[text]" divides by 1.1
VERB_TAGS = ("VB", "MD")  # tag prefixes of the verb leaves that give a VP its head
TO_PREPOSITIONS = frozenset({"next", "close", "adjacent", "prior"})  # "<word> to" is one preposition
ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Mx", "Dr", "Prof", "St", "Sr", "Jr", "Mt", "Ft", "Capt", "Col", "Gen", "Lt", "Sgt",
                 "Rev", "Hon", "Gov", "Sen", "Rep", "Pres", "Fr", "Mme", "Mlle", "vs")
"""Words whose "." is part of the word, not a segment end, when a word follows ("Mr. Smith"); initialisms of single
letters ("U.S.", "J.R.R.") keep their dots too."""

# Cascaded chunk grammar, applied stage by stage to each segment.
GRAMMAR = r"""
NP: {<PDT>?<DT|PRP\$>?<CD>*(<RB.*>*<JJ.*|VBN|CD>+<CC>?)*<NN.*|FW>+}  # base noun phrase: "three red apples"
    {<PRP>}                                                      # pronoun
PP: {<IN|TO>+<NP>}                                               # "on a wooden table", "next to a vase"
VP: {<MD>?<RB.*>*<VB.*>+<RB.*|RP>*(<NP>|<PP>|<RB.*>*<JJ.*>)*}     # "wearing a blue hat", "is very cute"
REL: {<WDT|WP|WP\$|IN><VP>}                                     # "that is sleeping on the sofa"
NP: {<NP><PP|VP|REL>+}                                           # attach modifiers to the preceding NP
COORD: {<NP>(<CC><NP>)+}                                         # "a cat and a dog"
"""

_TOKEN_RE = re.compile(
    r"(?i:embedding:[^\s,()\[\]]+)"
    r"|\b(?:" + "|".join(ABBREVIATIONS) + r")\.(?=\s*\w)"  # "Mr. Smith": the dot ends no segment
    r"|\b(?:[A-Za-z]\.){2,}"  # initialisms: "U.S.", "J.R.R."
    r"|'s\b|\w+(?:[-'’.%]\w+)*%?|[^\w\s]"
)


@dataclass(frozen=True)
class Phrase:
    """One phrase of eq. 4: a noun (cluster centre) and the words that joined it.

    text: its words in original prompt order, joined by spaces; noun: the centre word; noun_index / word_indices:
    indices into ``ParsedPrompt.words`` (ascending); ancestor: index into ``ParsedPrompt.phrases`` (itself for a
    root); weight: ComfyUI emphasis weight at the noun (1.0 if none)."""

    text: str
    noun: str
    noun_index: int
    word_indices: tuple[int, ...]
    ancestor: int
    weight: float


@dataclass(frozen=True)
class ParsedPrompt:
    """Result of :func:`parse_prompt`. ``tree`` is ``S -> SEG+ -> chunks`` with ``(word, tag)`` leaves, leaf i
    being ``words[i]``; ``phrases`` are in the order of their nouns in the prompt."""

    source: str
    text: str
    words: tuple[str, ...]
    tags: tuple[str, ...]
    tree: nltk.Tree
    phrases: tuple[Phrase, ...]


# ----------------------------------------------------------------------------------------------- emphasis syntax
def _find_close(s: str, i: int, opener: str, closer: str) -> int:
    """Index of the bracket closing ``s[i]`` (== opener), skipping escapes and nested pairs; -1 if unbalanced."""
    depth, j = 0, i
    while j < len(s):
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == opener:
            depth += 1
        elif c == closer:
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return -1


def _split_weight(inner: str) -> tuple[str, float | None]:
    """Split "text:1.3" into ("text", 1.3); (inner, None) when the part after the last top-level ':' is no finite
    number (so "embedding:name" stays as is)."""
    depth, k = 0, -1
    for idx, c in enumerate(inner):
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == ":" and depth == 0:
            k = idx
    if k < 0:
        return inner, None
    try:
        w = float(inner[k + 1:].strip())
    except ValueError:
        return inner, None
    return (inner[:k], w) if math.isfinite(w) else (inner, None)


def _emit(s: str, weight: float, out: list[tuple[str, float]]) -> None:
    """Recursive-descent walk over ``s`` appending (char, weight) pairs of the plain text to ``out``."""
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "()[]\\":
            out.append((s[i + 1], weight))  # escaped bracket: literal
            i += 2
            continue
        if c in "([":
            closer = ")" if c == "(" else "]"
            j = _find_close(s, i, c, closer)
            if j > 0:
                inner = s[i + 1:j]
                if c == "(":
                    inner, w = _split_weight(inner)
                    factor = EMPHASIS_UP if w is None else w
                else:
                    factor = 1.0 / EMPHASIS_UP
                out.append(("", weight))  # boundary: a space only between two word characters ("a(cat)b")
                _emit(inner, weight * factor, out)
                out.append(("", weight))
                i = j + 1
                continue
            logger.debug("unbalanced %r at %d in prompt kept literally", c, i)
        out.append((c, weight))
        i += 1


def strip_emphasis(prompt: str) -> tuple[str, list[tuple[int, int, float]]]:
    """Remove ComfyUI prompt-weighting syntax: "(text:1.3)", "(text)" (x1.1), "((text))" (x1.21), "[text]" (/1.1),
    escaped "\\(" "\\)" kept as literal parentheses, embedding:name left as is. Nested weights multiply; unbalanced
    brackets are kept literally. Whitespace is normalised (runs -> one space, stripped ends).

    Returns the plain text and the character spans ``(start, end, weight)`` (end exclusive, maximal runs) in the
    plain text with a weight != 1."""
    chars: list[tuple[str, float]] = []
    _emit(prompt or "", 1.0, chars)
    next_char = [""] * (len(chars) + 1)  # next_char[k]: first real character at or after k
    for k in range(len(chars) - 1, -1, -1):
        next_char[k] = chars[k][0] or next_char[k + 1]
    norm: list[tuple[str, float]] = []
    for k, (ch, w) in enumerate(chars):
        if ch == "":
            ch = " " if norm and norm[-1][0].isalnum() and next_char[k + 1][:1].isalnum() else ""
            if not ch:
                continue
        if ch.isspace():
            if norm and norm[-1][0] != " ":
                norm.append((" ", w))
        else:
            norm.append((ch, w))
    while norm and norm[-1][0] == " ":
        norm.pop()
    text = "".join(ch for ch, _ in norm)
    spans: list[tuple[int, int, float]] = []
    for idx, (_, w) in enumerate(norm):
        if spans and spans[-1][1] == idx and spans[-1][2] == w:
            spans[-1] = (spans[-1][0], idx + 1, w)
        elif not math.isclose(w, 1.0):
            spans.append((idx, idx + 1, w))
    return text, spans


# ------------------------------------------------------------------------------------------------ tokens and tags
def tokenize(text: str) -> list[tuple[str, int, int]]:
    """Split plain text into (word, start, end) with character offsets; "1girl", "cat-ear", "3.5", "café", "Mr."
    (:data:`ABBREVIATIONS`, when a word follows) and "U.S." are one word; "'s" and each punctuation mark or emoji are
    separate words."""
    return [(m.group(), m.start(), m.end()) for m in _TOKEN_RE.finditer(text)]


@lru_cache(maxsize=1)
def _pattern_tagger():
    from textblob.en.taggers import PatternTagger  # deferred: loads a lexicon file once

    return PatternTagger()


def tag_words(text: str) -> list[tuple[str, str]]:
    """Penn-tag whitespace-separated words: ``text`` is the words joined by single spaces; returns one (word, tag)
    per word, words unchanged. The one place the tagger lives: TextBlob's pattern tagger (offline, deterministic;
    unknown words such as "1girl" or "一只猫" come out NN). Tokens without a letter or digit become punctuation
    ("," / "." for segment marks) or SYM; "next"/"close"/"adjacent"/"prior" before "to" become IN."""
    words = text.split()
    if not words:
        return []
    tagged = _pattern_tagger().tag(" ".join(words), tokenize=False)
    if len(tagged) != len(words):  # defensive: the tagger re-split something; tag word by word instead
        logger.warning("tagger returned %d tags for %d words; tagging words one by one", len(tagged), len(words))
        tagged = [(_pattern_tagger().tag(w, tokenize=False) or [(w, "NN")])[0] for w in words]
    out = []
    for k, (w, (_, tag)) in enumerate(zip(words, tagged)):
        if w.lower() in TO_PREPOSITIONS and k + 1 < len(words) and words[k + 1].lower() == "to":
            tag = "IN"  # "next to": one preposition
        elif w in SEGMENT_TOKENS:
            tag = "," if w in ",;|" else "."
        elif w.lower().startswith("embedding:") or not re.search(r"\w", w):
            tag = "SYM"
        out.append((w, tag))
    return out


# ---------------------------------------------------------------------------------------------------------- tree
@lru_cache(maxsize=1)
def _chunker() -> nltk.RegexpParser:
    return nltk.RegexpParser(GRAMMAR)


def build_tree(tagged: list[tuple[str, str]]) -> nltk.Tree:
    """Syntax tree ``S -> SEG+ -> chunks`` over (word, tag) pairs (:data:`GRAMMAR`). A new SEG starts after each
    segment mark ``, ; | . ! ?`` (the mark stays, as a leaf, in the segment it ends), so a comma-separated tag
    prompt gets one subtree per tag. Leaves stay in prompt order."""
    segments: list[list[tuple[str, str]]] = [[]]
    for pair in tagged:
        segments[-1].append(pair)
        if pair[0] in SEGMENT_TOKENS:
            segments.append([])
    children = []
    for seg in segments:
        if seg:
            chunked = _chunker().parse(seg)
            children.append(nltk.Tree("SEG", list(chunked)))
    return nltk.Tree("S", children)


def _is_centre(tree: nltk.Tree, pos: tuple[int, ...]) -> bool:
    """Leaf at ``pos`` is a noun and not followed by another noun leaf under the same parent (compound rule)."""
    if tree[pos][1] not in NOUN_TAGS:
        return False
    parent, k = tree[pos[:-1]], pos[-1]
    nxt = parent[k + 1] if k + 1 < len(parent) else None
    return not (isinstance(nxt, tuple) and nxt[1] in NOUN_TAGS)


def compute_clusters(tree: nltk.Tree, barrier_labels: frozenset[str] = frozenset({"S"})) -> list[int | None]:
    """Cluster each leaf around its nearest noun, g-refine.txt eq. 4 (``phs[j].append(Tree[||pns[j], Tree||_min])``).

    tree: any nltk.Tree whose leaves are (word, tag) pairs. Distance = number of edges between two leaves through
    their lowest common ancestor; an LCA labelled in ``barrier_labels`` is not allowed (words don't join across
    segments). Ties go to the noun on the LEFT. Which leaves are centres / join: see the module docstring.
    Returns, per leaf (in leaf order), the leaf index of its centre (a centre maps to itself), or None.
    Cost: O(leaves x depth)."""
    positions = tree.treepositions("leaves")
    index = {p: i for i, p in enumerate(positions)}
    centres = {p for p in positions if _is_centre(tree, p)}
    # best[node] = (edges down to the nearest centre, its leaf index): leftmost among equals
    best: dict[tuple[int, ...], tuple[int, int]] = {}
    for p in sorted(centres, key=lambda q: -len(q)):
        for d in range(len(p) - 1, -1, -1):
            cand = (len(p) - d, index[p])
            if best.get(p[:d], (math.inf, math.inf)) > cand:
                best[p[:d]] = cand
    result: list[int | None] = []
    for p in positions:
        word_tag = tree[p]
        parent = tree[p[:-1]]
        if p in centres:
            result.append(index[p])
            continue
        if word_tag[1] in PUNCT_TAGS or (word_tag[1] == "CC" and parent.label() == "COORD"):
            result.append(None)
            continue
        choice = (math.inf, math.inf)
        for d in range(len(p) - 1, -1, -1):  # ancestors, nearest first
            anc = p[:d]
            if tree[anc].label() in barrier_labels:
                break
            if anc in best:
                choice = min(choice, (len(p) - d + best[anc][0], best[anc][1]))
        result.append(None if choice[0] == math.inf else int(choice[1]))
    return result


def phrase_ancestors(tree: nltk.Tree, clusters: list[int | None]) -> dict[int, int]:
    """Ancestor back-tracking, g-refine.txt Algorithm 1 (GET_PHRASE_ANCESTOR).

    clusters: output of :func:`compute_clusters`. Walks the tree breadth-first from the root; where a child's
    cluster (its head noun: module docstring; a VP's is the centre its verb joined) differs from its parent's, the
    child's cluster gets the cluster of the nearest ancestor node that has one. The first assignment (shallowest) is
    kept; clusters never assigned are roots. Returns {centre leaf index: ancestor centre leaf index}, a root mapping
    to itself."""
    positions = tree.treepositions("leaves")
    index = {p: i for i, p in enumerate(positions)}
    head: dict[tuple[int, ...], int | None] = {}

    def _verb_cluster(node: nltk.Tree, pos: tuple[int, ...]) -> int | None:
        """The cluster of the first verb leaf directly under ``node`` that joined a centre, else None."""
        for k, child in enumerate(node):
            if not isinstance(child, nltk.Tree) and child[1].startswith(VERB_TAGS):
                cluster = clusters[index[pos + (k,)]]
                if cluster is not None:
                    return cluster
        return None

    def head_of(pos: tuple[int, ...]) -> int | None:
        if pos in head:
            return head[pos]
        node = tree[pos]
        h = None
        if not isinstance(node, nltk.Tree):
            h = index[pos] if clusters[index[pos]] == index[pos] else None
        elif node.label() == "VP" and (verb := _verb_cluster(node, pos)) is not None:
            h = verb  # the noun the verb joined (eq. 4), never the noun of a PP under the verb
        elif node.label() not in HEADLESS_LABELS:
            leaf_heads = [head_of(pos + (k,)) for k, c in enumerate(node) if not isinstance(c, nltk.Tree)]
            leaf_heads = [x for x in leaf_heads if x is not None]
            if leaf_heads:
                h = leaf_heads[-1]
            else:
                first = next((k for k, c in enumerate(node) if isinstance(c, nltk.Tree)), None)
                h = None if first is None else head_of(pos + (first,))
        head[pos] = h
        return h

    ans = {i: i for i, c in enumerate(clusters) if c == i}
    assigned: set[int] = set()
    queue: deque[tuple[int, ...]] = deque([()])
    while queue:
        obj = queue.popleft()
        node = tree[obj]
        for k, child in enumerate(node):
            cpos = obj + (k,)
            if isinstance(child, nltk.Tree):
                queue.append(cpos)
            c = head_of(cpos)
            if c is None or c in assigned or c == head_of(obj):
                continue
            for d in range(len(obj), -1, -1):  # nearest ancestor carrying a noun
                a = head_of(obj[:d])
                if a is not None and a != c:
                    ans[c] = a
                    assigned.add(c)
                    break
    return ans


# ------------------------------------------------------------------------------------------------------ top level
def parse_prompt(prompt: str) -> ParsedPrompt:
    """Parse a (ComfyUI) prompt into phrases with ancestors for the AQ-Map (eq. 4 + Algorithm 1).

    Never raises on text input: an empty/whitespace prompt or one without a noun ("very beautiful") gives
    ``phrases == ()``. Deterministic: equal prompts give equal results."""
    if not isinstance(prompt, str):
        raise TypeError(f"parse_prompt expects a str prompt, got {type(prompt).__name__}")
    text, spans = strip_emphasis(prompt)
    tokens = tokenize(text)
    tagged = tag_words(" ".join(t[0] for t in tokens))
    tree = build_tree(tagged)
    clusters = compute_clusters(tree)
    ancestors = phrase_ancestors(tree, clusters)

    centres = [i for i, c in enumerate(clusters) if c == i]
    order = {c: j for j, c in enumerate(centres)}
    members: dict[int, list[int]] = {c: [] for c in centres}
    for i, c in enumerate(clusters):
        if c is not None:
            members[c].append(i)

    def weight_at(char: int) -> float:
        return next((w for s, e, w in spans if s <= char < e), 1.0)

    phrases = tuple(
        Phrase(
            text=" ".join(tokens[i][0] for i in members[c]),
            noun=tokens[c][0],
            noun_index=c,
            word_indices=tuple(members[c]),
            ancestor=order[ancestors.get(c, c)],
            weight=weight_at(tokens[c][1]),
        )
        for c in centres
    )
    if not phrases and tokens:
        logger.debug("prompt %r has no noun: no phrases", text[:80])
    return ParsedPrompt(
        source=prompt,
        text=text,
        words=tuple(t[0] for t in tokens),
        tags=tuple(t for _, t in tagged),
        tree=tree,
        phrases=phrases,
    )
