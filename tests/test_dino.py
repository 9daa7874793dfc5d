"""DINO: the teacher's EMA, the centre, the loss's limit, collapse, resume, k-NN, transfer."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cvformers import cli
from cvformers.data.multicrop import MultiCropConfig, make_views
from cvformers.eval.knn import knn_predict
from cvformers.models.dino import DINO, DINOConfig, dino_loss
from cvformers.train.teacher import CollapseMonitor, DINOTeacher, TeacherConfig
from cvformers.train.trainer import weight_decay_at

TINY_VIT = {"image_size": 8, "patch_size": 4, "in_chans": 1, "num_classes": 0, "embed_dim": 16, "depth": 1,
            "num_heads": 2, "mlp_ratio": 2.0}


def tiny_dino(out_dim: int = 32) -> DINO:
    torch.manual_seed(0)
    return DINO(DINOConfig(backbone=dict(TINY_VIT), out_dim=out_dim, hidden_dim=24, bottleneck_dim=8))


def views(batch: int = 6, local: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return make_views(torch.rand(batch, 1, 8, 8), MultiCropConfig(local_crops=local), 8, 4)


def test_teacher_after_a_step_is_the_ema_of_the_student():
    model = tiny_dino()
    teacher = DINOTeacher(TeacherConfig(momentum=0.9), total_steps=10, out_dim=32)
    teacher.on_fit_start(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        before = [p.clone() for p in teacher.teacher.parameters()]
        loss, _ = model.loss({"crops": views()})
        loss.backward()
        opt.step()
        opt.zero_grad()
        teacher.after_step(model, step)
        lam = 1 - (1 - 0.9) * (1 + math.cos(math.pi * step / 10)) / 2  # cosine 0.9 -> 1
        assert teacher.momentum(step) == pytest.approx(lam)
        moved = 0
        for old, new, student in zip(before, teacher.teacher.parameters(), model.parameters()):
            torch.testing.assert_close(new, lam * old + (1 - lam) * student, rtol=1e-6, atol=1e-6)
            moved += int(not torch.equal(new, old))
        assert moved > 0  # the student moved, so the teacher did
    assert teacher.momentum(10) == 1.0 and teacher.momentum(0) == pytest.approx(0.9)


def test_centre_follows_the_batch_mean_teacher_logit_at_its_momentum():
    model = tiny_dino()
    teacher = DINOTeacher(TeacherConfig(center_momentum=0.9), total_steps=10, out_dim=32)
    teacher.on_fit_start(model)
    for step in range(3):
        v = views()
        with torch.no_grad():
            logits = torch.cat(teacher.teacher.forward_views(v[:2]))
        c0 = teacher.center.clone()
        model.loss({"crops": v})
        teacher.after_step(model, step)
        torch.testing.assert_close(teacher.center, 0.9 * c0 + 0.1 * logits.mean(0, keepdim=True))
    # in eval mode the teacher's outputs do not move the centre
    c = teacher.center.clone()
    model.eval()
    model.loss({"crops": views()})
    teacher.after_step(model, 3)
    assert torch.equal(teacher.center, c)


def test_loss_with_a_frozen_cold_teacher_is_cross_entropy_to_its_argmax():
    model = tiny_dino()
    teacher = DINOTeacher(TeacherConfig(temp=1e-6, warmup_temp=1e-6), total_steps=10, out_dim=32)
    teacher.on_fit_start(model)
    teacher.center = torch.randn(1, 32)
    v = views(local=3)
    loss, metrics = model.loss({"crops": v})
    with torch.no_grad():
        t_logits = teacher.teacher.forward_views(v[:2])
        s_logits = model.forward_views(v)
    expected = []
    for i, t in enumerate(t_logits):
        target = (t - teacher.center).argmax(-1)
        expected += [F.cross_entropy(s / model.cfg.student_temp, target) for j, s in enumerate(s_logits) if j != i]
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    assert metrics["teacher_entropy"] == pytest.approx(0.0, abs=1e-5)


def test_dino_loss_skips_the_pair_of_the_same_view():
    p = torch.eye(4)[:2]  # two images, one-hot teachers
    same = [torch.full((2, 4), 0.0), torch.full((2, 4), 0.0)]
    # one pair per teacher view (the other global view): uniform student -> log 4
    assert float(dino_loss(same, [p, p], 1.0)) == pytest.approx(math.log(4))


def test_a_constant_model_is_flagged_by_the_monitor_and_a_healthy_one_is_not():
    model = tiny_dino()
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.zero_()  # every image gives the same features: the network has collapsed
    teacher = DINOTeacher(TeacherConfig(), total_steps=100, out_dim=32)
    teacher.on_fit_start(model)
    monitor = CollapseMonitor(out_dim=32)
    warnings = []
    for step in range(40):
        _, metrics = model.loss({"crops": views()})
        teacher.after_step(model, step)
        warnings += monitor.on_log(model, step + 1, metrics)
    assert warnings and "collapse" in warnings[0]
    assert {k for k, _ in monitor.diagnose(metrics)} >= {"uniform"}
    healthy = {"teacher_entropy": 0.5 * math.log(32), "kl": 0.4}
    assert CollapseMonitor(out_dim=32).on_log(model, 50, healthy) == []
    peaked = CollapseMonitor(out_dim=32).diagnose({"teacher_entropy": 0.001, "kl": 1e-5})
    assert {k for k, _ in peaked} == {"peaked", "copy"}


def test_last_layer_is_frozen_in_the_first_steps():
    model = tiny_dino()
    model.cfg.freeze_last_layer_steps = 2
    teacher = DINOTeacher(TeacherConfig(), total_steps=10, out_dim=32)
    teacher.on_fit_start(model)
    model.on_train_step(1, 10)
    model.loss({"crops": views()})[0].backward()
    assert model.head.last_layer.weight_v.grad is None and model.head.mlp[0].weight.grad is not None
    model.zero_grad()
    model.on_train_step(2, 10)
    model.loss({"crops": views()})[0].backward()
    assert model.head.last_layer.weight_v.grad is not None
    assert model.head.last_layer.weight_g.requires_grad is False  # norm_last_layer: g stays 1


def test_schedules_teacher_temperature_and_weight_decay():
    teacher = DINOTeacher(TeacherConfig(warmup_temp_steps=30), total_steps=100, out_dim=8)
    assert teacher.temperature(0) == pytest.approx(0.04)
    assert teacher.temperature(15) == pytest.approx(0.055)
    assert teacher.temperature(30) == teacher.temperature(99) == pytest.approx(0.07)
    assert weight_decay_at(0, 0.04, 0.4, 100) == pytest.approx(0.04)
    assert weight_decay_at(99, 0.04, 0.4, 100) == pytest.approx(0.4)
    assert 0.04 < weight_decay_at(50, 0.04, 0.4, 100) < 0.4


def test_views_have_the_multicrop_sizes():
    v = make_views(torch.rand(3, 1, 28, 28), MultiCropConfig(local_crops=4), *MultiCropConfig().sizes(28))
    assert [tuple(x.shape) for x in v] == [(3, 1, 28, 28)] * 2 + [(3, 1, 12, 12)] * 4
    assert all(float(x.min()) >= 0 and float(x.max()) <= 1 for x in v)
    assert MultiCropConfig().sizes(32) == (32, 16)


def test_weighted_knn_weighs_close_neighbours_more():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    # plain majority of all 5 neighbours says 1; the exp(s / T) weights say 0
    assert knn_predict(train, labels, query, k=5, temperature=0.07).tolist() == [0]
    assert knn_predict(train, labels, query, k=5, temperature=1e3).tolist() == [1]


TOY_CONFIG = """
[model]
preset = "vit_nano_patch4_32"
out_dim = 32
hidden_dim = 24
bottleneck_dim = 8
[model.backbone]
embed_dim = 16
depth = 1
num_heads = 2
[data]
size = 48
eval_size = 24
[crops]
local_crops = 2
[train]
batch_size = 8
eval_every = 2
checkpoint_every = 2
log_every = 1
warmup_steps = 1
[knn]
train_images = 24
test_images = 16
"""


def test_cli_dino_resumes_bit_exactly_and_evaluates(tmp_path, capsys):
    cfg = tmp_path / "dino.toml"
    cfg.write_text(TOY_CONFIG)
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    assert cli.main(["train", "dino", "--data", "shapes", "--out", whole, "--config", str(cfg), "--steps", "4"]) == 0
    assert cli.main(["train", "dino", "--data", "shapes", "--out", split, "--config", str(cfg), "--steps", "4",
                     "--until", "2"]) == 0
    assert cli.main(["train", "dino", "--out", split, "--resume"]) == 0
    for name in ("model.safetensors", "teacher.safetensors", "checkpoints/step-00000004/teacher.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "split" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    state = load_file(str(tmp_path / "whole/checkpoints/step-00000004/teacher.safetensors"))
    assert int(state["updates"]) == 4 and state["center"].abs().sum() > 0
    lines = [json.loads(x) for x in (tmp_path / "whole/metrics.jsonl").read_text().splitlines()]
    assert "teacher_entropy" in lines[0] and "kl" in lines[0]
    assert any("knn_top1" in x for x in lines if x["split"] == "eval")

    capsys.readouterr()
    assert cli.main(["eval", "knn", whole, "--data", "shapes", "--train-limit", "24", "--test-limit", "16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["weights"] == "teacher" and 0 <= result["knn_top1"] <= 1 and "linear_top1" in result
    assert cli.main(["eval", "knn", str(tmp_path / "nothing")]) == 2
    assert cli.main(["eval", "knn", whole, "--k", "0"]) == 2
    assert cli.main(["eval", "knn", whole, "--temperature", "nan"]) == 2

    from cvformers.images import save_image
    picture = tmp_path / "scene.png"
    save_image(torch.rand(3, 32, 32), picture)
    assert cli.main(["attention", str(picture), "--model", whole, "--out", str(tmp_path / "att.png")]) == 0
    assert (tmp_path / "att.png").stat().st_size > 0
    assert cli.main(["attention", str(picture), "--model", whole, "--out", str(tmp_path / "a.png"), "--keep", "0"]) == 2


def test_attention_mass_mask_keeps_the_largest_patches_up_to_the_share():
    from cvformers.pipelines.attention import attention_mass_mask

    att = torch.tensor([0.05, 0.5, 0.05, 0.3, 0.1])
    assert attention_mass_mask(att, 0.6).tolist() == [False, True, False, True, False]  # 0.5 < 0.6 <= 0.8
    assert attention_mass_mask(att, 0.5).tolist() == [False, True, False, False, False]
    assert attention_mass_mask(att, 1.0).all()


def test_classifier_starts_from_a_dino_run_and_refuses_another_architecture(tmp_path, capsys):
    cfg = tmp_path / "dino.toml"
    cfg.write_text(TOY_CONFIG)
    dino = tmp_path / "dino"
    assert cli.main(["train", "dino", "--data", "shapes", "--out", str(dino), "--config", str(cfg), "--steps", "2"]) == 0
    teacher = load_file(str(dino / "teacher.safetensors"))
    cls = tmp_path / "cls.toml"
    cls.write_text(f'[model]\npreset = "vit_nano_patch4_32"\ninit_from = "{dino}"\n[model.backbone]\nembed_dim = 16\n'
                   'depth = 1\nnum_heads = 2\n[data]\nsize = 48\neval_size = 24\n[train]\nbatch_size = 8\nlr = 1e-9\n'
                   'warmup_steps = 0\n')
    run = tmp_path / "cls"
    assert cli.main(["train", "classifier", "--data", "shapes", "--out", str(run), "--config", str(cls),
                     "--steps", "1"]) == 0
    trained = load_file(str(run / "model.safetensors"))
    torch.testing.assert_close(trained["backbone.patch_embed.proj.weight"],
                               teacher["backbone.patch_embed.proj.weight"], atol=1e-6, rtol=1e-4)
    capsys.readouterr()
    cls.write_text(cls.read_text().replace("depth = 1", "depth = 2"))
    assert cli.main(["train", "classifier", "--data", "shapes", "--out", str(tmp_path / "bad"), "--config", str(cls),
                     "--steps", "1"]) == 2
    assert "depth 1 there, 2 here" in capsys.readouterr().err


def test_clip_image_tower_starts_from_a_dino_run_and_refuses_another_architecture(tmp_path, capsys):
    cfg = tmp_path / "dino.toml"
    cfg.write_text(TOY_CONFIG.replace("[model.backbone]\nembed_dim = 16\ndepth = 1\nnum_heads = 2\n", ""))
    dino = tmp_path / "dino"
    assert cli.main(["train", "dino", "--data", "shapes", "--out", str(dino), "--config", str(cfg), "--steps", "1"]) == 0
    teacher = load_file(str(dino / "teacher.safetensors"))
    clip_cfg = tmp_path / "clip.toml"
    clip_cfg.write_text(f'[model]\nimage_encoder = "vit_nano_patch4_32"\ninit_from = "{dino}"\n'
                        '[data]\nsize = 32\neval_size = 16\n[text]\nbpe_train_captions = 200\n'
                        '[train]\nbatch_size = 8\nlr = 1e-9\nwarmup_steps = 0\neval_every = 0\n')
    run = tmp_path / "clip"
    assert cli.main(["train", "clip", "--data", "shapes", "--out", str(run), "--config", str(clip_cfg),
                     "--steps", "1"]) == 0
    tower = {k.removeprefix("visual.trunk."): v for k, v in load_file(str(run / "model.safetensors")).items()
             if k.startswith("visual.trunk.")}
    start = {k.removeprefix("backbone."): v for k, v in teacher.items() if k.startswith("backbone.")}
    shared = sorted(set(tower) & set(start))
    assert "patch_embed.proj.weight" in shared and len(shared) >= len(start) - 2  # the DINO head is not a trunk part
    for key in shared:
        torch.testing.assert_close(tower[key], start[key], atol=1e-6, rtol=1e-4)
    # a DINO run of another width cannot start this tower: one line naming the difference
    small = tmp_path / "small"
    cfg.write_text(TOY_CONFIG)
    assert cli.main(["train", "dino", "--data", "shapes", "--out", str(small), "--config", str(cfg), "--steps", "1"]) == 0
    capsys.readouterr()
    clip_cfg.write_text(clip_cfg.read_text().replace(str(dino), str(small)))
    assert cli.main(["train", "clip", "--data", "shapes", "--out", str(tmp_path / "bad"), "--config", str(clip_cfg),
                     "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cvformers: error:") and "\n" not in err and "embed_dim" in err
