"""Config and input mistakes fail before Ray starts (``sftray.recipes.preflight``), through the ``sftray`` command:
LoRA targets against the base model's module names, data and probe paths, the validation split."""

from __future__ import annotations

import shutil
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from sftray.config import compose_config
from sftray.models.tiny import ensure_tiny_tokenizer

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

CONF = Path(__file__).resolve().parents[2] / "conf"


pytestmark = pytest.mark.usefixtures("ray_untouched")  # every command here fails before init_ray


@pytest.fixture
def base_args(tmp_path: Path, cache_dir: Path, random_base: Path, write_sums) -> list[str]:
    chats = write_sums(tmp_path / "chats.jsonl", range(40))
    return [
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={tmp_path / 'out'}",
        "data=files",
        f"data.sources=[{{path:'{chats}'}}]",
        "data.max_seq_len=64",
        "data.val_fraction=0.2",  # a validation split of 40 conversations: only the mistake under test is wrong
        f"model.name_or_path={random_base}",
        "train.num_workers=1",
        "train.cpus_per_worker=0.5",
        "train.epochs=1",
    ]


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The command's one-line error (exit code 1, no traceback)."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and err.startswith("error: "), err
    return err.strip()


def test_a_lora_target_no_module_has_fails_before_ray(capsys, base_args, tmp_path):
    err = _error(capsys, "train", *base_args, "train.lora.target_modules=[nosuch]")
    assert err.startswith("error: train.lora.target_modules=['nosuch']: 'nosuch' matches no module of ")
    assert "q_proj" in err and "down_proj" in err and "all-linear" in err  # what it could have said
    assert not (tmp_path / "out").exists()  # no data prepared, no run started


def test_one_misspelled_lora_target_among_good_ones_fails(capsys, base_args):
    # peft would train the adapters of q_proj only and say nothing of v_prj
    err = _error(capsys, "train", *base_args, "train.lora.target_modules=[q_proj,v_prj]")
    assert "train.lora.target_modules=['q_proj', 'v_prj']: 'v_prj' matches no module of " in err


def test_lora_targets_of_the_builtin_are_checked_without_pretraining_it(capsys, cache_dir, tmp_path):
    # A cache of its own: in a whole-suite run the shared one may hold a base pretrained by an earlier test.
    cache = tmp_path / "cache"
    shutil.copytree(ensure_tiny_tokenizer(cache_dir), cache / "tiny-llama")  # the tokenizer only
    err = _error(
        capsys,
        "train",
        f"paths.cache_dir={cache}",
        f"paths.output_dir={tmp_path / 'out'}",
        "train.lora.target_modules=[qproj]",
    )
    assert "'qproj' matches no module of builtin:tiny-llama" in err
    assert not (cache / "tiny-llama-base-v2").exists()


def test_a_later_stage_s_lora_targets_are_checked(capsys, base_args):
    err = _error(capsys, "train", *base_args, "stages=demo_two_stage", "stages.1.train.lora.target_modules=[nosuch]")
    assert "stages[1] (json): train.lora.target_modules=['nosuch']: 'nosuch' matches no module" in err


def test_a_missing_data_path_fails_before_ray(capsys, base_args, tmp_path):
    missing = tmp_path / "nope.jsonl"
    args = [a for a in base_args if not a.startswith("data.sources=")]
    for command in ("prep", "train", "sweep"):
        err = _error(capsys, command, *args, f"data.sources=[{{path:'{missing}'}}]")
        assert err.startswith(f"error: data.sources[0]: no such file or folder: '{missing}'"), err


def test_a_missing_mix_path_fails_before_ray(capsys, base_args, tmp_path):
    err = _error(capsys, "prep", *base_args, f"mix.sources=[{{path:'{tmp_path / 'corpus'}',format:text}}]")
    assert err.startswith(f"error: mix.sources[0]: no such file or folder: '{tmp_path / 'corpus'}'"), err


def test_a_missing_probe_file_fails_before_ray(capsys, base_args, tmp_path):
    err = _error(capsys, "train", *base_args, f"data.probes={tmp_path / 'probes.jsonl'}")
    assert err == f"error: data.probes={tmp_path / 'probes.jsonl'}: no such file (a JSONL of probes, or null)"


def test_no_validation_split_fails_before_prep(capsys, base_args, tmp_path):
    for command in ("prep", "train"):
        err = _error(capsys, command, *base_args, "data.val_fraction=0")
        assert err == (
            "error: data.val_fraction=0 and no data.val_sources: there would be no validation conversations, and "
            "checkpoints are chosen by eval; set data.val_fraction (e.g. 0.05) or give data.val_sources"
        )
    assert not (tmp_path / "out").exists()


def test_a_missing_model_folder_fails_before_ray(capsys, base_args, tmp_path):
    err = _error(capsys, "train", *base_args, f"model.name_or_path={tmp_path / 'no-model'}")
    assert err.startswith(f"error: model.name_or_path={tmp_path / 'no-model'}: no such folder"), err


def test_a_missing_resume_folder_fails_before_ray(capsys, base_args, tmp_path):
    err = _error(capsys, "train", *base_args, f"train.resume_from={tmp_path / 'gone'}")
    assert err == f"error: train.resume_from={tmp_path / 'gone'}: no such folder"


def test_good_inputs_pass(base_args, tmp_path, write_sums):
    from sftray.recipes.preflight import check_inputs

    val = write_sums(tmp_path / "val.jsonl", range(100, 110))
    for extra in (
        [],
        ["train.lora.target_modules=[q_proj,v_proj]", "train.lora.modules_to_save=[lm_head]"],
        ["train.method=full", "data.val_fraction=0", f"data.val_sources=[{{path:'{val}'}}]"],
        ["stages=demo_two_stage"],
    ):
        check_inputs(compose_config([*base_args, *extra], conf=CONF, base=tmp_path), train=True)


def test_a_lora_target_that_is_no_layer_fails(capsys, base_args):
    err = _error(capsys, "train", *base_args, "train.lora.target_modules=[mlp]")
    assert "'mlp' matches model.layers.0.mlp (LlamaMLP) of " in err and "which LoRA cannot adapt" in err


def test_a_sweep_point_s_lora_targets_are_checked(capsys, base_args):
    err = _error(capsys, "sweep", *base_args, "+sweep.params.train.lora.target_modules=[[q_proj],[nosuch]]")
    assert err.startswith(
        "error: sweep.params.train.lora.target_modules=['nosuch']: train.lora.target_modules=['nosuch']: 'nosuch' "
        "matches no module of "
    ), err
    err = _error(capsys, "sweep", *base_args, "+sweep.points=[{train.method: lora, train.lora.target_modules: [k]}]")
    assert err.startswith("error: sweep.points[0]: train.lora.target_modules=['k']: 'k' matches no module"), err
