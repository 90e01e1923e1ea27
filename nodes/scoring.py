"""Preference scoring nodes: thin V3 adapters over ``core.rewards`` and ``core.reward_aggregation``.

- Load Reward Model: any format ``core.rewards.load_reward_model`` reads, from ``models/reward_models/``.
- Score Images: one score per image (FLOAT list) and a readable table.
- Rank Images: the batch sorted best-first, the best k, their indices.
- Multi-Reward Win Rate: Syn-Pic win rates ``phi`` of every image among the images of its prompt, under 1-4 rewards.

Each reward is moved to ComfyUI's compute device for the call and back to the offload device after
(``comfy_io.on_compute_device``); scoring runs in chunks of the reward's batch size, each chunk one forward, with a
progress bar that is also the interrupt point.
"""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io

import folder_paths

from ..core.clip_surgery import AUTO_ARCHITECTURE
from ..core.reward_aggregation import rank_order, ranks, select_best, syn_pic_win_rates
from ..core.rewards import REWARD_KINDS, RewardModel, detect_reward_kind, load_reward_model
from .comfy_io import (
    REWARD_MODELS_FOLDER,
    WEIGHT_EXTENSIONS,
    batch_chunks,
    check_images,
    on_compute_device,
    paths_fingerprint,
    resolve_model_file,
)

CATEGORY = "Refinery/scoring"
Reward = io.Custom("REFINERY_REWARD")
NO_TOWER = "none"


# -- helpers ---------------------------------------------------------------------------------------------------------
def reward_model_choices() -> list[str]:
    """Files with weight extensions and PickScore-style folders (holding a config.json) under
    models/reward_models/, as names relative to that folder."""
    names = set()
    for root in folder_paths.get_folder_paths(REWARD_MODELS_FOLDER):
        if not os.path.isdir(root):
            continue
        for directory, subdirs, files in os.walk(root, followlinks=True):
            relative = os.path.relpath(directory, root)
            if relative != "." and "config.json" in files:
                names.add(relative.replace(os.sep, "/"))
                subdirs[:] = []  # a model folder's own sub-folders are its parts
                continue
            names.update(os.path.normpath(os.path.join(relative, name)).replace(os.sep, "/")
                         for name in files if name.lower().endswith(WEIGHT_EXTENSIONS))
    return sorted(names)


def resolve_reward_entry(name: str) -> str:
    """Full path of a reward file or folder in models/reward_models/."""
    for root in folder_paths.get_folder_paths(REWARD_MODELS_FOLDER):
        candidate = os.path.join(root, name)
        if os.path.isdir(candidate):
            return candidate
    return resolve_model_file(REWARD_MODELS_FOLDER, name)


def reward_entry_files(name: str) -> list[str]:
    """The files a reward entry stands for: every file of a model folder (PickScore), or the file and an open_clip
    config ``<stem>.json`` beside it; paths that do not exist are kept (a file added later changes the
    fingerprint)."""
    for root in folder_paths.get_folder_paths(REWARD_MODELS_FOLDER):
        candidate = os.path.join(root, name)
        if os.path.isdir(candidate):
            return sorted(os.path.join(candidate, entry) for entry in os.listdir(candidate))
    path = folder_paths.get_full_path(REWARD_MODELS_FOLDER, name) or name
    return [path, os.path.splitext(path)[0] + ".json"]


def architecture_choices() -> list[str]:
    """'auto' and every open_clip architecture name (rewards take any open_clip tower, not only ViTs)."""
    import open_clip

    return [AUTO_ARCHITECTURE, *open_clip.list_models()]


def image_prompts(prompt: str, batch: int, per_line: bool) -> list[str]:
    """The prompt of every image: the whole text for all images, or (per_line) one non-empty line per image."""
    if not per_line:
        return [prompt] * batch
    lines = [line.strip() for line in prompt.splitlines() if line.strip()]
    if len(lines) != batch:
        raise ValueError(f"'prompt' has {len(lines)} non-empty lines for a batch of {batch} images: with "
                         f"prompt_per_line on, write one prompt per image (or turn it off to use one prompt for all).")
    return lines


def score_batch(reward: RewardModel, images: torch.Tensor, prompts: list[str], progress: bool = True) -> torch.Tensor:
    """(B, H, W, 3) in [0, 1] -> (B,) float32 scores on the CPU, chunk by chunk on the compute device."""
    if not isinstance(reward, RewardModel):
        raise ValueError(f"'reward' must be a REFINERY_REWARD from Load Reward Model, got {type(reward).__name__}.")
    scores = []
    with on_compute_device(reward):
        for part in batch_chunks(images.shape[0], reward.batch_size, progress):
            scores.append(reward.score(images[part], prompts[part]).cpu())
    return torch.cat(scores)


def score_table(names: list[str], scores: torch.Tensor, prompts: list[str], extra: dict[str, torch.Tensor] | None = None) -> str:
    """A Markdown table: image index, one column per reward (scores (n, B)), extra columns, prompt."""
    extra = extra or {}
    header = ["image", *names, *extra, "prompt"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index in range(scores.shape[1]):
        cells = [str(index), *(f"{float(scores[r, index]):.4f}" for r in range(scores.shape[0])),
                 *(f"{float(values[index]):.4f}" for values in extra.values()), prompts[index][:80]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _prompt_inputs() -> list:
    return [
        io.String.Input("prompt", multiline=True, default="",
                        tooltip="The prompt the images were made for (prompt-free rewards such as aesthetic heads "
                        "ignore it)."),
        io.Boolean.Input("prompt_per_line", default=False,
                         tooltip="On: one prompt per line, one line per image of the batch. Off: the whole text is "
                         "the prompt of every image."),
    ]


# -- nodes -------------------------------------------------------------------------------------------------------------
class RewardModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefineryRewardModelLoader",
            display_name="Load Reward Model (Refinery)",
            category=CATEGORY,
            description="Loads a reward model from models/reward_models/: CLIPScore on any open_clip checkpoint, "
            "HPSv2/HPSv2.1 (HPS_v2*_compressed.pt), PickScore (a transformers CLIP folder), a LAION aesthetic head "
            "(with its CLIP tower), or a reward trained with refinery-train-preference. Nothing is downloaded.",
            inputs=[
                io.Combo.Input("model", options=reward_model_choices(),
                               tooltip="A file, or a PickScore folder (with config.json), in models/reward_models/."),
                io.Combo.Input("kind", options=["auto", *REWARD_KINDS], default="auto",
                               tooltip="auto reads the layout: a CLIP folder = PickScore, HPSv2's {'state_dict'} .pt = "
                               "HPSv2, Refinery metadata = trained, head-only keys = aesthetic. A bare open_clip "
                               "checkpoint needs clip-score or hpsv2."),
                io.Combo.Input("architecture", options=architecture_choices(), default=AUTO_ARCHITECTURE,
                               tooltip="open_clip architecture of the checkpoint (clip-score, hpsv2) or of the "
                               "aesthetic head's tower, e.g. ViT-H-14 or ViT-L-14-quickgelu. auto = the format's "
                               "default (HPSv2: ViT-H-14), or the open_clip config <checkpoint>.json beside the file "
                               "(clip-score, aesthetic tower); PickScore and trained rewards carry their own."),
                io.Combo.Input("tower", options=[NO_TOWER, *reward_model_choices()], default=NO_TOWER,
                               tooltip="Aesthetic heads only: the open_clip checkpoint the head was fit on (LAION's "
                               "heads: OpenAI ViT-L/14)."),
                io.Int.Input("batch_size", default=16, min=1, max=1024,
                             tooltip="Images per forward. Lower it if the GPU runs out of memory."),
            ],
            outputs=[Reward.Output("reward")],
        )

    @classmethod
    def validate_inputs(cls, architecture: str) -> bool | str:
        """The architecture list, plus "" (the text box of earlier versions, saved in old workflows) meaning auto;
        ComfyUI skips its own list check for an input validated here."""
        if architecture in ("", *architecture_choices()):
            return True
        return (f"Unknown open_clip architecture '{architecture}': choose one from the list (open_clip's names), or "
                f"'{AUTO_ARCHITECTURE}'.")

    @classmethod
    def fingerprint_inputs(cls, model: str, kind: str, architecture: str, tower: str, batch_size: int):
        """The files the load reads (the reward, its config beside it, the tower), so replacing any reloads."""
        files = reward_entry_files(model) + (reward_entry_files(tower) if tower != NO_TOWER else [])
        return (paths_fingerprint(files), kind, architecture, tower, batch_size)

    @classmethod
    def execute(cls, model: str, kind: str, architecture: str, tower: str, batch_size: int) -> io.NodeOutput:
        path = resolve_reward_entry(model)
        options: dict = {"batch_size": batch_size}
        detected = detect_reward_kind(path) if kind == "auto" else kind
        architecture = "" if architecture.strip() == AUTO_ARCHITECTURE else architecture.strip()
        if detected == "aesthetic":
            if tower == NO_TOWER:
                raise ValueError(f"'{model}' is an aesthetic head: choose its CLIP tower in 'tower' (a checkpoint in "
                                 f"models/reward_models/; LAION's heads use OpenAI ViT-L/14).")
            options["tower"] = resolve_reward_entry(tower)
            if architecture:
                options["tower_architecture"] = architecture
        elif detected in ("clip-score", "hpsv2") and architecture:
            options["architecture"] = architecture
        reward = load_reward_model(path, detected, **options)
        return io.NodeOutput(reward)


class ScoreImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefineryScoreImages",
            display_name="Score Images (Refinery)",
            category=CATEGORY,
            description="Scores every image of a batch with a reward model (higher = better): one score per image "
            "and a table. The value range is the reward's own (CLIPScore 0-2.5, HPSv2 ~0.2-0.3, PickScore ~20, "
            "aesthetic 1-10).",
            inputs=[
                Reward.Input("reward", tooltip="A reward model from Load Reward Model (higher score = better)."),
                io.Image.Input("image", tooltip="A batch of any size; each image gets its own score."),
                *_prompt_inputs(),
            ],
            outputs=[
                io.Float.Output("score", tooltip="One per image, in batch order.", is_output_list=True),
                io.String.Output("table", tooltip="Markdown table of the scores."),
            ],
        )

    @classmethod
    def execute(cls, reward, image, prompt: str, prompt_per_line: bool) -> io.NodeOutput:
        images = check_images(image)
        prompts = image_prompts(prompt, images.shape[0], prompt_per_line)
        scores = score_batch(reward, images, prompts)
        table = score_table([reward.name], scores[None], prompts)
        return io.NodeOutput([float(value) for value in scores], table, ui={"text": [table]})


class RankImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefineryRankImages",
            display_name="Rank / Select Best (Refinery)",
            category=CATEGORY,
            description="Sorts a batch best-first by a reward and keeps the best k (ties keep batch order). The images "
            "are the input pixels, unchanged.",
            inputs=[
                Reward.Input("reward", tooltip="A reward model from Load Reward Model (higher score = better)."),
                io.Image.Input("image", tooltip="The batch to sort; the outputs are its own pixels, reordered."),
                *_prompt_inputs(),
                io.Int.Input("k", default=1, min=1, max=4096,
                             tooltip="How many of the best images 'best' holds (at most the batch size)."),
            ],
            outputs=[
                io.Image.Output("ranked", tooltip="The whole batch, best first."),
                io.Image.Output("best", tooltip="The k best images, best first."),
                io.String.Output("indices", tooltip="Batch indices best first, e.g. '2, 0, 1'."),
                io.String.Output("table", tooltip="Scores and ranks."),
            ],
        )

    @classmethod
    def execute(cls, reward, image, prompt: str, prompt_per_line: bool, k: int) -> io.NodeOutput:
        images = check_images(image)
        if k > images.shape[0]:
            raise ValueError(f"k is {k} but the batch holds {images.shape[0]} images: lower k.")
        prompts = image_prompts(prompt, images.shape[0], prompt_per_line)
        scores = score_batch(reward, images, prompts)
        order = rank_order(scores)
        best = select_best(scores, k)
        table = score_table([reward.name], scores[None], prompts, {"rank": ranks(scores).float()})
        indices = ", ".join(str(int(i)) for i in order)
        return io.NodeOutput(image[order], image[best], indices, table, ui={"text": [table]})


class RewardWinRate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefineryRewardWinRate",
            display_name="Multi-Reward Win Rate (Refinery)",
            category=CATEGORY,
            description="Syn-Pic win rates (RankDPO): each image's share of wins against the other images of its "
            "prompt, over every connected reward: phi = wins / (n (k - 1)), a tie counting half. The batch is split "
            "into consecutive groups of images_per_prompt images (one prompt each).",
            inputs=[
                Reward.Input("reward_1", tooltip="The first reward model (from Load Reward Model)."),
                io.Image.Input("image", tooltip="The images of every prompt, images_per_prompt consecutive images "
                               "per prompt."),
                *_prompt_inputs(),
                io.Int.Input("images_per_prompt", default=0, min=0, max=4096,
                             tooltip="k: images generated per prompt, consecutive in the batch. 0 = the whole batch "
                             "is one prompt's images."),
                *(Reward.Input(f"reward_{index}", optional=True,
                               tooltip="Another reward (optional): phi counts the wins under every connected reward.")
                  for index in (2, 3, 4)),
            ],
            outputs=[
                io.Float.Output("win_rate", tooltip="phi in [0, 1], one per image.", is_output_list=True),
                io.Image.Output("best", tooltip="The image with the highest phi of each prompt group."),
                io.String.Output("table", tooltip="Scores under each reward and phi."),
            ],
        )

    @classmethod
    def execute(cls, reward_1, image, prompt: str, prompt_per_line: bool, images_per_prompt: int,
                reward_2=None, reward_3=None, reward_4=None) -> io.NodeOutput:
        images = check_images(image)
        batch = images.shape[0]
        group = images_per_prompt or batch
        if group < 2 or batch % group:
            raise ValueError(f"images_per_prompt is {group} for a batch of {batch}: it must be at least 2 and divide "
                             f"the batch (images of one prompt consecutive), or 0 for one group.")
        prompts = image_prompts(prompt, batch, prompt_per_line)
        rewards = [reward for reward in (reward_1, reward_2, reward_3, reward_4) if reward is not None]
        scores = torch.stack([score_batch(reward, images, prompts) for reward in rewards])  # (n, B)
        grouped = scores.reshape(len(rewards), batch // group, group).permute(1, 0, 2)  # (P, n, k)
        phi = syn_pic_win_rates(grouped).reshape(batch)  # (P, k) -> (B,)
        best = torch.tensor([start + int(select_best(phi[start:start + group], 1)[0])
                             for start in range(0, batch, group)])
        table = score_table([reward.name for reward in rewards], scores, prompts, {"win_rate": phi})
        return io.NodeOutput([float(value) for value in phi], image[best], table, ui={"text": [table]})


NODES = [RewardModelLoader, ScoreImages, RankImages, RewardWinRate]
