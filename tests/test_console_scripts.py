"""Every console command of pyproject.toml: it prints its --help (argparse formats every help string then, so a stray
"%" in one breaks the command for everybody), and, run end to end as a subprocess (the installed console script, or
the same ``sys.exit(main())`` wrapper where it is not installed) on the shipped toy models with small settings, it
exits with status 0 and writes its output. A script chains them as a user would: refinery-synpic's dataset trains
refinery-train-rankdpo."""

from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path

import pytest
from tiny_models import PACK_ROOT, SUBPROCESS_ENV, TINY_SD, TOY_CLIP, console_command, console_scripts

try:
    import tomllib  # noqa: F401
except ImportError:  # Python 3.10
    from ci import importorskip

    importorskip("tomli")  # under CI a missing test dependency fails

SCRIPTS = console_scripts()
PROMPTS = ["a small red circle on a plain grey background", "a large blue square on a plain black background"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_command_prints_its_help(name, capsys):
    module_name, function_name = SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module_name), function_name)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert f"usage: {name}" in capsys.readouterr().out


def run_console(name: str, *arguments, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*console_command(name), *map(str, arguments)], capture_output=True, text=True,
                          timeout=timeout, env=SUBPROCESS_ENV, cwd=PACK_ROOT)


def assert_success(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (f"exit status {result.returncode}\nstdout:\n{result.stdout}\n"
                                    f"stderr:\n{result.stderr}")
    assert "Traceback" not in result.stderr, result.stderr


def prompts_file(folder: Path, count: int = 2) -> Path:
    path = folder / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:count]) + "\n")
    return path


@pytest.fixture(scope="module")
def synpic_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synpic")
    output = folder / "data"
    result = run_console("refinery-synpic", "--prompts", prompts_file(folder), "--model", TINY_SD, "--seeds", 2,
                         "--reward", TOY_CLIP, "--reward-kind", "clip-score", "--steps", 4, "--guidance-scale", 3,
                         "--threads", 1, "--output-dir", output)
    return result, output


def test_refinery_synpic_exits_0(synpic_run):
    result, output = synpic_run
    assert_success(result)
    lines = [json.loads(line) for line in (output / "index.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == PROMPTS
    assert all((output / image).is_file() for line in lines for image in line["images"])
    assert f"Wrote {output / 'index.jsonl'}" in result.stdout


def test_refinery_train_rankdpo_exits_0(synpic_run, tmp_path):
    _, dataset = synpic_run
    result = run_console("refinery-train-rankdpo", "--dataset", dataset, "--model", TINY_SD, "--output-dir", tmp_path,
                         "--max-train-steps", 1, "--train-batch-size", 2, "--lr-warmup-steps", 0, "--threads", 1)
    assert_success(result)
    assert (tmp_path / "rankdpo_lora.safetensors").is_file() and (tmp_path / "training_config.json").is_file()


def test_refinery_train_focus_n_fix_exits_0(tmp_path):
    result = run_console("refinery-train-focus-n-fix", "--prompts", prompts_file(tmp_path, 1), "--model", TINY_SD,
                         "--reward", TOY_CLIP, "--reward-kind", "clip-score", "--output-dir", tmp_path / "out",
                         "--max-train-steps", 1, "--train-batch-size", 1, "--sampling-steps", 2, "--truncate-k", 1,
                         "--guidance-scale", 1, "--mask-samples", 0, "--lr-warmup-steps", 0, "--threads", 1)
    assert_success(result)
    assert (tmp_path / "out" / "focus_n_fix_lora.safetensors").is_file()


def test_refinery_train_preference_exits_0(tmp_path):
    from comfyui_refinery.benchmarks.toyworld import preference_data

    preference_data.build_split(tmp_path / "pairs", 4, preference_data.TRAIN_SEED_OFFSET)
    result = run_console("refinery-train-preference", "--dataset", tmp_path / "pairs", "--checkpoint", TOY_CLIP,
                         "--output-dir", tmp_path / "out", "--max-train-steps", 1, "--train-batch-size", 2,
                         "--augmentations", 1, "--trainable-image-layers", 1, "--trainable-text-layers", 1,
                         "--lr-warmup-steps", 0, "--threads", 1)
    assert_success(result)
    assert (tmp_path / "out" / "reward.safetensors").is_file() and (tmp_path / "out" / "reward.json").is_file()


FALSE_WARNINGS = (
    "No pretrained weights loaded",  # open_clip's create_model(pretrained=None): the weights are loaded right after
    "initialized randomly",
    "No LoRA keys associated",  # diffusers, for each text encoder of a UNet-only LoRA
)


def test_refinery_demo_exits_0_and_prints_no_false_warnings(tmp_path):
    output = tmp_path / "demo"
    result = run_console("refinery-demo", "--output", output, "--generated", 1, "--defective", 1, "--steps", 2,
                         "--refine-steps", 2, "--finetuned", 1)
    assert_success(result)
    for name in ("grid.png", "report.md", "finetuned.png"):
        assert (output / name).is_file(), name
    assert f"Wrote {output.resolve()}/grid.png" in result.stdout
    for warning in FALSE_WARNINGS:
        assert warning not in result.stderr, f"{warning!r} in the demo's stderr:\n{result.stderr}"
