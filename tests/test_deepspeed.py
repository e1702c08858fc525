"""DeepSpeed ZeRO through ``training.deepspeed``: the shipped configs, DeepSpeed checkpoints, MoE leaf marking.

DeepSpeed is optional (requirements-gpu.txt: its source build pulls torch into an isolated env); tests
that need it are skipped without it. The checkpoint-layout and launch checks need only the file system.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO

from dsocr.checkpoints import CheckpointError, check_launch, is_complete_checkpoint, plan_resume

CONFIGS = sorted((REPO / "configs" / "deepspeed").glob("*.json"))


def _fake_checkpoint(path: Path, world: int, deepspeed: int | None, shards: int | None = None) -> Path:
    """The files a checkpoint of this pipeline holds, empty: enough for the layout checks."""
    path.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "run_config.yaml"):
        (path / name).write_text("{}")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": int(path.name.split("-")[1])}))
    (path / "launch.json").write_text(json.dumps({"world_size": world, "global_batch": 8, "deepspeed": deepspeed}))
    for r in range(world):
        (path / ("rng_state.pth" if world == 1 else f"rng_state_{r}.pth")).write_text("")
    if deepspeed:
        step = path / f"global_step{path.name.split('-')[1]}"
        step.mkdir()
        (path / "latest").write_text(step.name)
        (step / "mp_rank_00_model_states.pt").write_text("")
        for r in range(world if shards is None else shards):
            (step / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_text("")
    else:
        (path / "optimizer.pt").write_text("")
        (path / "scheduler.pt").write_text("")
    return path


def test_deepspeed_checkpoint_without_optimizer_pt_is_complete_and_latest(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "checkpoint-4", world=2, deepspeed=3)
    assert not (ckpt / "optimizer.pt").exists()
    assert is_complete_checkpoint(ckpt) == (True, "")
    plan = plan_resume("latest", tmp_path, 10, launch={"world_size": 2, "global_batch": 8, "deepspeed": 3})
    assert plan.checkpoint == str(ckpt)


def test_deepspeed_checkpoint_missing_a_rank_shard_is_incomplete(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoint-2", world=2, deepspeed=2)
    bad = _fake_checkpoint(tmp_path / "checkpoint-4", world=2, deepspeed=2, shards=1)
    ok, missing = is_complete_checkpoint(bad)
    assert not ok and "global_step4/*optim_states.pt (1 of 2 ranks)" in missing
    plan = plan_resume("latest", tmp_path, 10, launch={"world_size": 2, "global_batch": 8, "deepspeed": 2})
    assert plan.checkpoint == str(tmp_path / "checkpoint-2")


def test_per_rank_rng_files_are_required(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "checkpoint-2", world=2, deepspeed=None)
    (ckpt / "rng_state_1.pth").unlink()
    ok, missing = is_complete_checkpoint(ckpt)
    assert not ok and missing == "rng_state_1.pth"


def test_resume_on_another_world_size(tmp_path):
    """DDP: allowed with the same global batch (with a note), refused with another; ZeRO: refused."""
    ddp = _fake_checkpoint(tmp_path / "a" / "checkpoint-2", world=2, deepspeed=None)
    note = check_launch(ddp, {"world_size": 4, "global_batch": 8})
    assert "instead of 2: same global batch" in note and "not bit for bit" in note
    assert check_launch(ddp, {"world_size": 2, "global_batch": 8}) == ""
    with pytest.raises(CheckpointError, match="global batch changed from 8 to 16"):
        check_launch(ddp, {"world_size": 4, "global_batch": 16})
    zero = _fake_checkpoint(tmp_path / "b" / "checkpoint-2", world=2, deepspeed=2)
    with pytest.raises(CheckpointError, match="DeepSpeed ZeRO checkpoint .* resume with 2 processes"):
        check_launch(zero, {"world_size": 1, "global_batch": 8})


def test_shipped_deepspeed_configs_are_stages_2_3_and_3_offload():
    stages = {p.stem: json.loads(p.read_text())["zero_optimization"] for p in CONFIGS}
    assert {k: v["stage"] for k, v in stages.items()} == {"zero2": 2, "zero3": 3, "zero3_offload": 3}
    assert stages["zero3_offload"]["offload_optimizer"]["device"] == "cpu"
    # Full checkpoints must carry loadable weights (eval_cer.py, export), not only ZeRO shards.
    assert stages["zero3"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_deepspeed_config_is_accepted_by_training_arguments(path, tiny_cfg):
    pytest.importorskip("deepspeed")
    from dsocr.config import training_arguments
    from dsocr.distributed import launch_record

    args = training_arguments(tiny_cfg("deepseek_ocr_v1", f"training.deepspeed={path}"))
    assert args.hf_deepspeed_config.is_zero3() == (json.loads(path.read_text())["zero_optimization"]["stage"] == 3)
    assert launch_record(args)["deepspeed"] == json.loads(path.read_text())["zero_optimization"]["stage"]


@pytest.mark.parametrize("family", ["deepseek_ocr_v1", "deepseek_ocr2"])
def test_moe_blocks_are_zero3_leaves(family, tiny_cfg):
    pytest.importorskip("deepspeed")
    from deepspeed.utils import z3_leaf_module

    from dsocr.adapters import prepare_training
    from dsocr.distributed import mark_moe_leaves
    from dsocr.loading import load_base

    loaded = load_base(tiny_cfg(family))
    prepare_training(loaded)
    names = mark_moe_leaves(loaded.model)
    moe = [m for m in loaded.model.modules() if type(m).__name__ in names]
    assert names and moe and all(z3_leaf_module(m) for m in moe)
    assert not any(z3_leaf_module(m) for m in loaded.model.modules() if type(m).__name__ not in names)


@pytest.mark.slow
def test_zero2_one_rank_trains_saves_and_resumes(demo_data, tiny_model_dirs, tmp_path):
    """train_lora.py under torchrun with ZeRO-2 on CPU: a DeepSpeed checkpoint (no optimizer.pt) that
    resumes to the same adapter as the uninterrupted run."""
    pytest.importorskip("deepspeed")
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    from test_multiprocess import ENV, _free_port

    def run(out: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(_free_port()),
               "train/train_lora.py", "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
               f"model.name_or_path={tiny_model_dirs('deepseek_ocr_v1')}", f"data.dataset={demo_data}", f"output_dir={out}",
               f"training.deepspeed={REPO / 'configs' / 'deepspeed' / 'zero2.json'}", "training.report_to=[]",
               "data.max_train_samples=8", "data.max_eval_samples=2", "eval.train_cer_samples=0",
               "training.metric_for_best_model=eval_loss", "training.per_device_train_batch_size=2",
               "training.max_steps=4", "training.save_steps=2", "training.eval_steps=100", "training.logging_steps=1", *extra]
        log = out.parent / f"{out.name}.log"
        with open(log, "a") as f:
            rc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, stdout=f, stderr=subprocess.STDOUT,
                                timeout=900).returncode
        assert rc == 0, log.read_text()[-3000:]

    full, cut = tmp_path / "full", tmp_path / "cut"
    run(full)
    ckpt = full / "checkpoint-2"
    assert (ckpt / "latest").is_file() and not (ckpt / "optimizer.pt").exists() and is_complete_checkpoint(ckpt)[0]
    run(cut, f"resume_from_checkpoint={ckpt}")  # the DeepSpeed engine loads global_step2/
    a, b = load_file(str(full / "final" / "adapter_model.safetensors")), load_file(str(cut / "final" / "adapter_model.safetensors"))
    assert all(float((a[k] - b[k]).abs().max()) == 0.0 for k in a)
