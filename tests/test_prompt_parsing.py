"""Tests for core/prompt_parsing.py: eq. 4 clustering and Algorithm 1 ancestors of g-refine.txt.

Each hand-made prompt lists its expected phrases as (text, noun, ancestor index). Notes on the tagger (TextBlob
pattern tagger): it tags "that" as IN (handled by the REL rule), "girl's" as one NNS word, emoji fall back to NN
(we retag symbols as SYM). No assertion below was loosened to fit a tagging error.
"""

import nltk
import pytest

from comfyui_refinery.core.prompt_parsing import (
    ParsedPrompt,
    Phrase,
    build_tree,
    compute_clusters,
    parse_prompt,
    phrase_ancestors,
    strip_emphasis,
    tag_words,
    tokenize,
)

CASES = [
    # adjectives, plurals, numbers
    ("a cute cat", [("a cute cat", "cat", 0)]),
    ("three red apples", [("three red apples", "apples", 0)]),
    ("two cats, a cat", [("two cats", "cats", 0), ("a cat", "cat", 1)]),
    ("a black and white cat", [("a black and white cat", "cat", 0)]),
    # verb phrases attached to the preceding noun phrase
    ("a cat wearing a blue hat", [("a cat", "cat", 0), ("wearing a blue hat", "hat", 0)]),
    ("a dog running in the park", [("a dog running", "dog", 0), ("in the park", "park", 0)]),
    ("the cat is on the mat", [("the cat is", "cat", 0), ("on the mat", "mat", 0)]),
    # prepositional phrases
    ("a red apple on a wooden table", [("a red apple", "apple", 0), ("on a wooden table", "table", 0)]),
    ("an old man with a beard", [("an old man", "man", 0), ("with a beard", "beard", 0)]),
    (
        "a black and white cat sitting on a table near a window",
        [("a black and white cat sitting", "cat", 0), ("on a table", "table", 0), ("near a window", "window", 0)],
    ),
    # every PP under a verb hangs from the noun the verb describes, not from the first PP's noun
    (
        "a cat sitting on a table next to a blue vase",
        [("a cat sitting", "cat", 0), ("on a table", "table", 0), ("next to a blue vase", "vase", 0)],
    ),
    # a verb with an object: the VP is the object's, so its PPs hang from the object
    (
        "a man riding a horse on a beach",
        [("a man", "man", 0), ("riding a horse", "horse", 0), ("on a beach", "beach", 1)],
    ),
    # abbreviations keep their dot and split no segment; a real "." still does
    ("Mr. Smith walking a dog", [("Mr. Smith", "Smith", 0), ("walking a dog", "dog", 0)]),
    ("a portrait of Dr. Jones in the U.S. Army. A dog",
     [("a portrait", "portrait", 0), ("of Dr. Jones", "Jones", 0), ("in the U.S. Army", "Army", 0),
      ("A dog", "dog", 3)]),
    # relative clauses
    ("a dog that is sleeping on the sofa", [("a dog that", "dog", 0), ("is sleeping on the sofa", "sofa", 0)]),
    ("a dog which sleeps", [("a dog which sleeps", "dog", 0)]),
    (
        "a woman who is holding a cup of coffee",
        [("a woman who", "woman", 0), ("is holding a cup", "cup", 0), ("of coffee", "coffee", 1)],
    ),
    # conjunctions: coordinated phrases are roots, the linking "and" joins no phrase
    ("a cat and a dog", [("a cat", "cat", 0), ("a dog", "dog", 1)]),
    (
        "a man and a woman holding umbrellas",
        [("a man", "man", 0), ("a woman", "woman", 1), ("holding umbrellas", "umbrellas", 1)],
    ),
    # comma-separated tag prompts: one root per segment; noun-less segments give nothing
    (
        "masterpiece, 1girl, blue hair, best quality",
        [("masterpiece", "masterpiece", 0), ("1girl", "1girl", 1), ("blue hair", "hair", 2), ("best quality", "quality", 3)],
    ),
    ("masterpiece, highly detailed, 1girl", [("masterpiece", "masterpiece", 0), ("1girl", "1girl", 1)]),
    ("a girl with long hair wearing a red dress, standing in a field of flowers",
     [("a girl", "girl", 0), ("with long hair", "hair", 0), ("wearing a red dress", "dress", 0),
      ("standing in a field", "field", 3), ("of flowers", "flowers", 3)]),
    # compounds: the last noun of a noun run is the centre
    ("tennis ball", [("tennis ball", "ball", 0)]),
    ("a photo of Taylor Swift", [("a photo", "photo", 0), ("of Taylor Swift", "Swift", 0)]),
    ("a girl's hat; a dog", [("a girl's hat", "hat", 0), ("a dog", "dog", 1)]),
    # ComfyUI emphasis syntax
    ("(red hat:1.3), ((cat)), [blurry]", [("red hat", "hat", 0), ("cat", "cat", 1)]),
    ("a \\(literal\\) cat", [("a literal cat", "cat", 0)]),  # "(" ")" are SYM: kept as words, join no phrase
    ("embedding:easynegative, a cat", [("a cat", "cat", 0)]),
    # non-ASCII
    ("a café in Zürich", [("a café", "café", 0), ("in Zürich", "Zürich", 0)]),
    ("一只猫, a dog 😀", [("一只猫", "一只猫", 0), ("a dog", "dog", 1)]),
    # no noun / empty
    ("very beautiful", []),
    ("running quickly", []),
    ("", []),
    ("   \n\t ", []),
]


def _summary(parsed: ParsedPrompt) -> list[tuple[str, str, int]]:
    return [(p.text, p.noun, p.ancestor) for p in parsed.phrases]


@pytest.mark.parametrize("prompt,expected", CASES, ids=[c[0][:40] or "empty" for c in CASES])
def test_hand_made_prompts(prompt, expected):
    parsed = parse_prompt(prompt)
    assert _summary(parsed) == expected
    # structural invariants of every result
    assert len(parsed.words) == len(parsed.tags) == len(parsed.tree.leaves())
    assert [w for w, _ in parsed.tree.leaves()] == list(parsed.words)
    covered = set()
    for j, ph in enumerate(parsed.phrases):
        assert list(ph.word_indices) == sorted(ph.word_indices)
        assert ph.noun == parsed.words[ph.noun_index] and ph.noun_index in ph.word_indices
        assert ph.text == " ".join(parsed.words[i] for i in ph.word_indices)
        assert 0 <= ph.ancestor < len(parsed.phrases)
        assert not covered & set(ph.word_indices)  # phrases are disjoint
        covered |= set(ph.word_indices)
    assert [p.noun_index for p in parsed.phrases] == sorted(p.noun_index for p in parsed.phrases)


def test_case_count():
    assert len(CASES) >= 25


def test_empty_prompt_shape():
    parsed = parse_prompt("")
    assert parsed.text == "" and parsed.words == () and parsed.phrases == ()
    assert parsed.tree.label() == "S" and len(parsed.tree) == 0


def test_non_string_prompt_is_a_clear_error():
    with pytest.raises(TypeError, match="str"):
        parse_prompt(None)


# --------------------------------------------------------------------------------------------- emphasis syntax
@pytest.mark.parametrize(
    "prompt,text,spans",
    [
        ("(red hat:1.3)", "red hat", [(0, 7, 1.3)]),
        ("(cat)", "cat", [(0, 3, 1.1)]),
        ("((cat))", "cat", [(0, 3, 1.1 * 1.1)]),
        ("[blurry]", "blurry", [(0, 6, 1 / 1.1)]),
        ("a \\(literal\\) cat", "a (literal) cat", []),
        ("a ((red:1.5) hat:2)", "a red hat", [(2, 5, 3.0), (5, 9, 2.0)]),
        ("(embedding:foo)", "embedding:foo", [(0, 13, 1.1)]),
        ("embedding:foo, cat", "embedding:foo, cat", []),
        ("(cat:1.2", "(cat:1.2", []),  # unbalanced: literal
        ("a   cat \n dog ", "a cat dog", []),
        ("(a cat:1.0)", "a cat", []),  # weight 1 is no span
        ("a(cat)b, (dog), x", "a cat b, dog, x", [(2, 5, 1.1), (9, 12, 1.1)]),
    ],
)
def test_strip_emphasis(prompt, text, spans):
    got_text, got_spans = strip_emphasis(prompt)
    assert got_text == text
    assert len(got_spans) == len(spans)
    for (s, e, w), (s2, e2, w2) in zip(got_spans, spans):
        assert (s, e) == (s2, e2) and w == pytest.approx(w2)


def test_phrase_weights_from_emphasis():
    parsed = parse_prompt("(red hat:1.3), ((cat)), a [dog], (a ((blue)) bird:1.5)")
    weights = {p.noun: p.weight for p in parsed.phrases}
    assert weights["hat"] == pytest.approx(1.3)
    assert weights["cat"] == pytest.approx(1.21)
    assert weights["dog"] == pytest.approx(1 / 1.1)
    assert weights["bird"] == pytest.approx(1.5)  # the noun's weight; "blue" alone is 1.5 * 1.21
    assert parsed.text == "red hat, cat, a dog, a blue bird"
    assert parse_prompt("a cat").phrases[0].weight == 1.0


# ------------------------------------------------------------------------------------------ tagger and tree
def test_tagger_tags_unknown_tag_words_as_nouns():
    tags = dict(tag_words("1girl , 1boy , solo"))
    assert tags["1girl"] == "NN" and tags["1boy"] == "NN" and tags[","] == ","


def test_tokenize_offsets():
    text = "a café, 1girl"
    toks = tokenize(text)
    assert [t[0] for t in toks] == ["a", "café", ",", "1girl"]
    assert all(text[s:e] == w for w, s, e in toks)


def test_abbreviation_dots_end_no_segment():
    assert [t[0] for t in tokenize("Mr. Smith, Mrs.Jones vs. the U.S. team. A cat")] == [
        "Mr.", "Smith", ",", "Mrs.", "Jones", "vs.", "the", "U.S.", "team", ".", "A", "cat"
    ]
    assert [t[0] for t in tokenize("a portrait of Mr.")] == ["a", "portrait", "of", "Mr", "."]  # nothing follows
    assert [t[0] for t in tokenize("a cat. Dog")] == ["a", "cat", ".", "Dog"]
    assert len(parse_prompt("a photo of Mr. Smith with a hat").tree) == 1  # one segment
    assert len(parse_prompt("a photo of a man. A hat").tree) == 2


def test_next_to_is_one_preposition():
    assert dict(tag_words("a cat next to a dog"))["next"] == "IN"
    assert dict(tag_words("the next cat"))["next"] != "IN"


def test_tree_one_subtree_per_comma_segment():
    tree = parse_prompt("masterpiece, 1girl, blue hair, best quality").tree
    assert tree.label() == "S"
    assert [t.label() for t in tree] == ["SEG"] * 4
    assert [[w for w, _ in seg.leaves() if w != ","] for seg in tree] == [
        ["masterpiece"], ["1girl"], ["blue", "hair"], ["best", "quality"]
    ]


def test_tree_grammar_attachments():
    tree = build_tree(tag_words("a red apple on a wooden table"))
    np = tree[0][0]
    assert np.label() == "NP" and [c.label() for c in np] == ["NP", "PP"]
    tree = build_tree(tag_words("a dog that is sleeping"))
    assert [c.label() for c in tree[0][0]] == ["NP", "REL"]


# ------------------------------------------------------------- eq. 4 and Algorithm 1 on hand-made trees
def _leaf(word, tag):
    return (word, tag)


def test_tie_goes_to_the_left_noun():
    # "x" is 3 edges from both nouns (x -> X -> NP -> noun)
    tree = nltk.Tree("X", [nltk.Tree("NP", [_leaf("cat", "NN")]), _leaf("x", "JJ"), nltk.Tree("NP", [_leaf("dog", "NN")])])
    assert compute_clusters(tree) == [0, 0, 2]


def test_nearest_noun_wins_over_the_left_one():
    # x is 2 edges from dog (same Y node) and 4 from cat
    tree = nltk.Tree(
        "X",
        [nltk.Tree("NP", [_leaf("cat", "NN")]), nltk.Tree("Y", [_leaf("x", "JJ"), _leaf("y", "IN"), nltk.Tree("NP", [_leaf("dog", "NN")])])],
    )
    assert compute_clusters(tree) == [0, 3, 3, 3]


def test_words_do_not_join_across_the_root_or_through_coordination():
    tree = nltk.Tree("S", [nltk.Tree("SEG", [_leaf("cat", "NN")]), nltk.Tree("SEG", [_leaf("red", "JJ")])])
    assert compute_clusters(tree) == [0, None]
    coord = nltk.Tree("COORD", [nltk.Tree("NP", [_leaf("cat", "NN")]), _leaf("and", "CC"), nltk.Tree("NP", [_leaf("dog", "NN")])])
    assert compute_clusters(coord) == [0, None, 2]


def test_compound_nouns_share_one_centre():
    tree = nltk.Tree("NP", [_leaf("a", "DT"), _leaf("tennis", "NN"), _leaf("ball", "NN")])
    assert compute_clusters(tree) == [2, 2, 2]


def test_algorithm1_on_a_hand_made_tree():
    # a cat [wearing a hat [with a feather]] ; a dog
    feather = nltk.Tree("PP", [_leaf("with", "IN"), nltk.Tree("NP", [_leaf("a", "DT"), _leaf("feather", "NN")])])
    hat = nltk.Tree("NP", [nltk.Tree("NP", [_leaf("a", "DT"), _leaf("hat", "NN")]), feather])
    cat = nltk.Tree("NP", [nltk.Tree("NP", [_leaf("a", "DT"), _leaf("cat", "NN")]), nltk.Tree("VP", [_leaf("wearing", "VBG"), hat])])
    tree = nltk.Tree("S", [nltk.Tree("SEG", [cat]), nltk.Tree("SEG", [nltk.Tree("NP", [_leaf("a", "DT"), _leaf("dog", "NN")])])])
    clusters = compute_clusters(tree)
    #            a  cat wearing a  hat with a  feather a  dog
    assert clusters == [1, 1, 1, 4, 4, 7, 7, 7, 9, 9]  # wearing: 4 edges to cat and to hat -> left
    assert phrase_ancestors(tree, clusters) == {1: 1, 4: 1, 7: 4, 9: 9}


def test_algorithm1_pps_under_a_verb_hang_from_the_noun_the_verb_describes():
    # a cat [sitting [on a table] [near a vase]]: the VP has no noun leaf and no object; before the fix its head was
    # its first PP's noun (table), so the vase's ancestor was the table
    def noun_phrase(noun):
        return nltk.Tree("NP", [_leaf("a", "DT"), _leaf(noun, "NN")])

    def pp(prep, noun):
        return nltk.Tree("PP", [_leaf(prep, "IN"), noun_phrase(noun)])

    def sentence(subject, vp):
        return nltk.Tree("S", [nltk.Tree("SEG", [nltk.Tree("NP", [noun_phrase(subject), vp])])])

    tree = sentence("cat", nltk.Tree("VP", [_leaf("sitting", "VBG"), pp("on", "table"), pp("near", "vase")]))
    clusters = compute_clusters(tree)
    #                    a  cat sitting on a table near a vase
    assert clusters == [1, 1, 1, 5, 5, 5, 8, 8, 8]  # sitting: 4 edges to cat and to table -> left
    assert phrase_ancestors(tree, clusters) == {1: 1, 5: 1, 8: 1}
    # a VP whose verb joined its object is the object's: its PPs hang from the object
    tree = sentence("man", nltk.Tree("VP", [_leaf("riding", "VBG"), noun_phrase("horse"), pp("on", "beach")]))
    clusters = compute_clusters(tree)
    assert clusters == [1, 1, 4, 4, 4, 7, 7, 7]
    assert phrase_ancestors(tree, clusters) == {1: 1, 4: 1, 7: 4}


# ---------------------------------------------------------------------------------- robustness, determinism
def test_very_long_prompts_parse_whole():
    prompt = " ".join(["a fluffy cat sitting on a red chair near the window and"] * 84)  # 1008 words, no commas
    parsed = parse_prompt(prompt)
    assert len(parsed.words) == 1008
    assert len(parsed.phrases) == 3 * 84
    parsed = parse_prompt(", ".join(["masterpiece", "1girl", "blue hair", "best quality"] * 250))
    assert len(parsed.phrases) == 1000
    assert all(p.ancestor == j for j, p in enumerate(parsed.phrases))


@pytest.mark.parametrize("prompt", ["((((", "]]))", "\\", "::", "(cat:abc)", "[a (b:nan)]", "😀😀", "a/b, , ,", "'s"])
def test_odd_input_never_crashes(prompt):
    parsed = parse_prompt(prompt)
    assert isinstance(parsed, ParsedPrompt)
    assert all(isinstance(p, Phrase) for p in parsed.phrases)


def test_deterministic():
    prompt = "a girl with long hair wearing a red dress, (standing in a field:1.2) of flowers"
    a, b = parse_prompt(prompt), parse_prompt(prompt)
    assert a.phrases == b.phrases and a.words == b.words and a.tags == b.tags and a.text == b.text
    assert a.tree == b.tree


def test_long_emphasised_prompt_keeps_its_weights():
    prompt = ", ".join(["(red hat:1.3)", "((cat))", "[blurry]", "a (small:0.8) dog"] * 200)
    parsed = parse_prompt(prompt)
    assert [p.weight for p in parsed.phrases[:3]] == pytest.approx([1.3, 1.21, 1.0])
