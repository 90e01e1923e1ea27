"""refinery-synpic on the committed tiny pipeline and the toy-clip CLIPScore reward: dataset layout, win rates,
determinism, resume after a kill, generators with a scheduler and a LoRA, and bad input."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_refinery.trainers.synpic import generators as synpic_generators
from comfyui_refinery.trainers.synpic import run as synpic
from PIL import Image
from tiny_models import TINY_SD, TOY_CLIP, TOY_MODELS, read_lora

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a small red circle on a plain grey background", "a large blue square on a plain black background",
           "a small green star on a plain grey background"]


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# toy prompts\n" + PROMPTS[0] + "\n\n" + "\n".join(PROMPTS[1:]) + "\n")
    return path


def arguments(prompts: Path, output: Path, *extra: str) -> list[str]:
    return ["--prompts", str(prompts), "--model", str(TINY_SD), "--reward", str(TOY_CLIP), "--reward-kind",
            "clip-score", "--output-dir", str(output), "--steps", "4", "--guidance-scale", "3", "--threads", "1",
            *(extra or ("--seeds", "3"))]


def read_index(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((folder / "images").glob("*"))}


def interrupt_drawing(monkeypatch, batch_number: int) -> None:
    """The ``batch_number``-th pipeline call (1-based) raises KeyboardInterrupt, as Ctrl-C or a kill there would."""
    original = synpic_generators.draw
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == batch_number:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(synpic, "draw", interrupted)


def test_dataset_layout_win_rates_and_scores(prompts_file, tmp_path):
    from comfyui_refinery.core.rewards.loading import load_reward_model

    output = tmp_path / "out"
    index = synpic.run(arguments(prompts_file, output))
    assert index == output.resolve() / "index.jsonl"
    lines = read_index(output)
    assert [line["prompt"] for line in lines] == PROMPTS
    reward = load_reward_model(TOY_CLIP, "clip-score")
    for number, line in enumerate(lines):
        assert line["images"] == [f"images/p{number:06d}_g{g:02d}.png" for g in range(3)]
        assert line["generators"] == ["seed-0", "seed-1", "seed-2"] and len(set(line["seeds"])) == 3
        rates = line["win_rates"]
        assert all(0 <= rate <= 1 for rate in rates) and sum(rates) == pytest.approx(1.5)  # k / 2
        pictures = torch.stack([torch.from_numpy(np.array(Image.open(output / name).convert("RGB"))).float() / 255
                                for name in line["images"]])
        assert pictures.shape == (3, 64, 64, 3)
        rescored = reward.score(pictures, [line["prompt"]] * 3)
        assert line["scores"]["toy-clip"] == pytest.approx(rescored.tolist(), abs=1e-4)
        scores = line["scores"]["toy-clip"]
        for i in range(3):  # one reward: phi orders the pictures exactly as the score does
            for j in range(3):
                if scores[i] > scores[j]:
                    assert rates[i] > rates[j]
    config = json.loads((output / "synpic_config.json").read_text())
    assert config["reward_names"] == ["toy-clip"] and len(config["generators"]) == 3
    assert not list(output.rglob("*.tmp"))


def test_deterministic_and_batch_size_independent(prompts_file, tmp_path):
    synpic.main(arguments(prompts_file, tmp_path / "a", "--seeds", "2", "--batch-size", "3"))
    synpic.main(arguments(prompts_file, tmp_path / "b", "--seeds", "2", "--batch-size", "3"))
    assert png_bytes(tmp_path / "a") == png_bytes(tmp_path / "b")
    synpic.main(arguments(prompts_file, tmp_path / "c", "--seeds", "2", "--batch-size", "1"))
    for name in png_bytes(tmp_path / "a"):  # batching may move a float by an ulp, never a picture
        first = np.asarray(Image.open(tmp_path / "a" / "images" / name), dtype=int)
        second = np.asarray(Image.open(tmp_path / "c" / "images" / name), dtype=int)
        assert np.abs(first - second).max() <= 1, name


def test_killed_run_resumes_to_the_same_dataset(prompts_file, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    synpic.main(arguments(prompts_file, straight, "--seeds", "2", "--batch-size", "2"))
    original = synpic_generators.draw
    interrupt_drawing(monkeypatch, 3)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        synpic.run(arguments(prompts_file, resumed, "--seeds", "2", "--batch-size", "2"))
    assert len(list((resumed / "images").glob("*.png"))) == 3  # generator 0 complete (2 batches), nothing else
    assert not (resumed / "index.jsonl").exists()
    monkeypatch.setattr(synpic, "draw", original)
    drawn = []
    monkeypatch.setattr(synpic, "draw", lambda *args, **kwargs: drawn.append(1) or original(*args, **kwargs))
    synpic.main(arguments(prompts_file, resumed, "--seeds", "2", "--batch-size", "2"))
    assert len(drawn) == 2  # only generator 1's two batches were drawn again
    assert png_bytes(resumed) == png_bytes(straight)
    assert read_index(resumed) == read_index(straight)
    assert not list(resumed.rglob("*.tmp"))


def test_generators_file_with_scheduler_and_lora(prompts_file, tmp_path):
    from comfyui_refinery.core.lora_export import export_comfyui_lora
    from comfyui_refinery.trainers.common.lora import add_lora
    from comfyui_refinery.trainers.common.model_loading import load_sd_pipeline

    pipeline = load_sd_pipeline(TINY_SD)
    add_lora(pipeline.unet, rank=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in pipeline.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    lora = export_comfyui_lora(tmp_path / "lora.safetensors", base_family="sd15", method="test", unet=pipeline.unet)
    spec_file = tmp_path / "generators.json"
    spec_file.write_text(json.dumps([
        {"name": "base"},
        {"name": "base-euler", "scheduler": "EulerDiscreteScheduler", "seed": 0},
        {"name": "lora", "lora": str(lora), "lora_scale": 1.0, "seed": 0},
    ]))
    output = tmp_path / "out"
    synpic.main(arguments(prompts_file, output, "--generators", str(spec_file)))
    lines = read_index(output)
    assert lines[0]["generators"] == ["base", "base-euler", "lora"]
    assert lines[0]["seeds"][0] == lines[0]["seeds"][1] == lines[0]["seeds"][2]  # same noise: only the model differs
    pictures = [Image.open(output / name).tobytes() for name in lines[0]["images"]]
    assert pictures[0] != pictures[1] and pictures[0] != pictures[2]


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("extra, message", [
    (("--seeds", "1"), "k >= 2 images per prompt"),
    (("--seeds", "2", "--steps", "0"), "--steps must be at least 1"),
    (("--seeds", "2", "--height", "30"), "multiple of 8"),
    (("--seeds", "2", "--reward-kind", "clip-score"), "--reward-kind was given 2 time(s)"),
])
def test_bad_flags(prompts_file, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as caught:
        synpic.main(arguments(prompts_file, tmp_path / "out", *extra))
    assert caught.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_generator_files(prompts_file, tmp_path, capsys):
    cases = [([{"name": "a"}, {"name": "a"}], "distinct"),
             ([{"name": "a"}, {"name": "b", "scheduler": "MagicScheduler"}], "unknown scheduler 'MagicScheduler'"),
             ([{"name": "a"}, {"name": "b", "lora": str(tmp_path / "none.safetensors")}], "LoRA"),
             ([{"name": "a"}, {"name": "b", "colour": "red"}], "unknown key(s) ['colour']"),
             ({"name": "a"}, "JSON list")]
    for content, message in cases:
        spec = tmp_path / "generators.json"
        spec.write_text(json.dumps(content))
        with pytest.raises(SystemExit) as caught:
            synpic.main(arguments(prompts_file, tmp_path / "out", "--generators", str(spec)))
        assert caught.value.code == 2
        assert message in capsys.readouterr().err, message


def test_bad_prompts_and_rewards(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(SystemExit, match="holds no prompt"):
        synpic.main(arguments(empty, tmp_path / "out"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a red circle"}\n{"prompt": ""}\nnot json\n')
    with pytest.raises(SystemExit, match=r"2 problem\(s\)") as caught:
        synpic.main(arguments(broken, tmp_path / "out"))
    assert "line 2: needs a non-empty string 'prompt'" in str(caught.value) and "line 3: malformed JSON" in str(
        caught.value)
    with pytest.raises(SystemExit) as caught:
        synpic.main(arguments(tmp_path / "missing.txt", tmp_path / "out"))
    assert caught.value.code == 2 and "does not exist" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    not_a_reward = tmp_path / "not-a-reward.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(not_a_reward))
    with pytest.raises(SystemExit, match="Cannot load a reward model"):
        synpic.main(["--prompts", str(prompts), "--model", str(TINY_SD), "--seeds", "2", "--reward",
                     str(not_a_reward), "--output-dir", str(tmp_path / "out2")])


def test_changed_options_are_refused_unless_overwrite(prompts_file, tmp_path):
    output = tmp_path / "out"
    synpic.main(arguments(prompts_file, output, "--seeds", "2"))
    with pytest.raises(SystemExit, match="other options") as caught:
        synpic.main(arguments(prompts_file, output, "--seeds", "2", "--guidance-scale", "5"))
    assert "guidance_scale" in str(caught.value)
    synpic.main(arguments(prompts_file, output, "--seeds", "2", "--guidance-scale", "5", "--overwrite"))
    assert json.loads((output / "synpic_config.json").read_text())["guidance_scale"] == 5


def test_unwritable_output_folder(prompts_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match="Cannot write into --output-dir"):
        synpic.main(arguments(prompts_file, blocker / "out"))


def _lora_variants(tmp_path: Path) -> dict[str, Path]:
    """A shipped tiny-sd LoRA relabelled as SDXL, one with other layer shapes (another base model's), and a pickle
    with a .safetensors name."""
    from safetensors.torch import save_file

    shipped = TOY_MODELS / "loras" / "rankdpo.safetensors"
    tensors, metadata = read_lora(shipped)
    variants = {"sdxl": tmp_path / "sdxl-lora.safetensors", "shapes": tmp_path / "other-base.safetensors",
                "pickle": tmp_path / "pickled.safetensors"}
    save_file(tensors, str(variants["sdxl"]), metadata={**metadata, "refinery.base_family": "sdxl"})
    wider = {key: torch.zeros(value.shape[0], 2 * value.shape[1]) if key.endswith("lora_down.weight") else value
             for key, value in tensors.items()}
    save_file(wider, str(variants["shapes"]))
    torch.save(tensors, variants["pickle"])
    return variants


@pytest.mark.parametrize("variant, message", [
    ("sdxl", "was trained for sdxl, but the model is sd15"),
    ("shapes", "layers have other shapes than the model's"),
    ("pickle", "is not a readable safetensors file"),
])
def test_a_lora_of_another_base_model_is_refused_clearly(prompts_file, tmp_path, variant, message):
    from comfyui_refinery.trainers.common.lora import LoraMismatchError
    from comfyui_refinery.trainers.synpic.generators import load_generator

    lora = _lora_variants(tmp_path)[variant]
    spec = tmp_path / "generators.json"
    spec.write_text(json.dumps([{"name": "base"}, {"name": "tuned", "lora": str(lora)}]))
    if variant != "shapes":  # refused before anything is drawn or written
        with pytest.raises(SystemExit, match=message):
            synpic.main(arguments(prompts_file, tmp_path / "out", "--generators", str(spec)))
        assert not (tmp_path / "out").exists()
    from comfyui_refinery.trainers.synpic.config import GeneratorSpec

    with pytest.raises(LoraMismatchError, match=message) as caught:
        load_generator(GeneratorSpec(name="tuned", model=TINY_SD, lora=lora), torch.device("cpu"), torch.float32)
    assert lora.name in str(caught.value)


# ------------------------------------------------------------------------------------------------ console behaviour
def test_ctrl_c_exits_130_saying_what_is_saved_and_how_to_continue(prompts_file, tmp_path, monkeypatch, capsys):
    original = synpic_generators.draw
    interrupt_drawing(monkeypatch, 2)
    output = tmp_path / "out"
    command = arguments(prompts_file, output, "--seeds", "2", "--batch-size", "2")
    assert synpic.main(command) == 130
    message = capsys.readouterr().err
    assert "refinery-synpic: interrupted while drawing: 2 of 6 pictures are saved in" in message
    assert "The same command continues where it stopped:" in message
    printed = shlex.split(message.split("where it stopped:\n", 1)[1].strip().splitlines()[0])
    assert printed[-len(command):] == command  # the very arguments, after the program
    assert not list(output.rglob("*.tmp"))
    monkeypatch.setattr(synpic, "draw", original)
    assert synpic.main(command) == 0
    assert len(read_index(output)) == 3


def test_a_changed_batch_size_is_refused_on_rerun_with_the_reason(prompts_file, tmp_path):
    """Batched sampling moves a few pixels by one level (test_deterministic_and_batch_size_independent), so a
    dataset continued with another batch size would mix two batchings: the rerun is refused, naming the old size."""
    output = tmp_path / "out"
    synpic.run(arguments(prompts_file, output, "--seeds", "2", "--batch-size", "3"))
    (output / "images" / "p000002_g01.png").unlink()  # a picture to draw again
    with pytest.raises(SystemExit) as caught:
        synpic.main(arguments(prompts_file, output, "--seeds", "2", "--batch-size", "1"))
    message = str(caught.value.code)
    assert "batch_size: 3 -> 1" in message and "rerun with --batch-size 3" in message, message
    assert not (output / "images" / "p000002_g01.png").exists()  # nothing was drawn
    synpic.run(arguments(prompts_file, output, "--seeds", "2", "--batch-size", "3"))
    assert (output / "images" / "p000002_g01.png").is_file()


def test_the_same_files_named_by_other_paths_are_the_same_run(prompts_file, tmp_path, monkeypatch):
    output = tmp_path / "out"
    synpic.run(arguments(prompts_file, output, "--seeds", "2"))
    before = png_bytes(output)
    monkeypatch.chdir(tmp_path)
    relative = arguments(Path(prompts_file.name), Path("out"), "--seeds", "2")
    relative[relative.index("--model") + 1] = os.path.relpath(TINY_SD, tmp_path)
    synpic.run(relative)  # refused as "other options (prompts ... differ)" when paths were compared as typed
    assert png_bytes(output) == before
    config = json.loads((output / "synpic_config.json").read_text())
    assert config["prompts"] == str(prompts_file.resolve())
    assert config["generators"][0]["model"] == str(TINY_SD.resolve())
