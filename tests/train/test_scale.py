"""Training at scale (ovseg.train.scale): the sampler and per-item randomness, the corpora, and on
`ovseg train ovsegmentor`: 2 gloo processes under torchrun train the same weights as 1 process with the same
global batch, a run killed with SIGKILL and resumed ends with the same weights as an uninterrupted one, and
a WebDataset shard and a JSONL caption corpus made here train."""

import io
import json
import subprocess
import sys
import tarfile

import pytest
import torch

from helpers import COCO_DEV, kill_after_checkpoint

from ovseg.train.scale.corpora import CaptionFileCorpus, CorpusError, TarCorpus, open_corpus
from ovseg.train.scale.dist import Context
from ovseg.train.scale.loop import epoch_indices, item_seed, steps_per_epoch

# ------------------------------------------------------------------------------------------- the loop


def test_each_global_batch_is_the_same_set_of_items_for_any_process_count():
    n, batch = 53, 8
    one = epoch_indices(n, batch, 3, Context(0, 1), seed=7)
    assert len(one) == steps_per_epoch(n, batch) * batch == 48 and len(set(one)) == 48
    for world in (2, 4):
        shares = [epoch_indices(n, batch, 3, Context(r, world), seed=7) for r in range(world)]
        local = batch // world
        for k in range(len(one) // batch):
            got = sorted(i for s in shares for i in s[k * local : (k + 1) * local])
            assert got == sorted(one[k * batch : (k + 1) * batch])
    assert epoch_indices(n, batch, 4, Context(0, 1), seed=7) != one  # a new order each epoch


def test_item_seed_depends_on_seed_epoch_and_index_only():
    assert item_seed(0, 1, 2) == item_seed(0, 1, 2)
    assert len({item_seed(0, 1, 2), item_seed(1, 1, 2), item_seed(0, 2, 2), item_seed(0, 1, 3)}) == 4


def test_a_training_set_smaller_than_a_batch_is_refused():
    with pytest.raises(ValueError, match="fewer than one batch"):
        steps_per_epoch(3, 8)


# ---------------------------------------------------------------------------------------------- corpora


def test_a_plan_whose_epochs_grow_trains_every_batch_and_resumes_in_place(tmp_path):
    """A curriculum's epochs hold more batches as classes join (cap2seg): every planned batch trains once, the
    per-epoch means divide by that epoch's batches, and a state written mid-run resumes to the same weights."""
    from ovseg.train.scale.loop import LoopConfig, fit

    class Source:
        def __len__(self):
            return 12

        def item(self, key, epoch):
            return torch.tensor([float(key), float(epoch)])

    plan = {0: [[0, 1]], 1: [[2, 3], [4, 5]], 2: [[6, 7], [8, 9], [10, 11]]}
    seen, crash_at = [], [None]

    def step(model, batch, epoch):
        if len(seen) == crash_at[0]:
            raise RuntimeError("crash")
        seen.append([int(v) for v in batch[:, 0]])
        loss = ((model(batch) - 1.0) ** 2).mean()
        return loss, {"total": float(loss.detach()), "zero_based": float(epoch)}

    def run(state, resume):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        cfg = LoopConfig(epochs=3, batch_size=2, checkpoint=str(state), checkpoint_every=1, resume=resume,
                         progress=False)
        return model, fit(model, opt, None, Source(), step, cfg, Context(), collate=torch.stack,
                          plan=lambda epoch: plan[epoch])

    model, record = run(tmp_path / "a.pt", False)
    assert seen == [b for e in range(3) for b in plan[e]] and record["steps"] == 6
    # each epoch's record is the mean over its own batches: the logged 0-based epoch comes back whole
    assert [(r["epoch"], r["zero_based"]) for r in record["epochs"]] == [(1, 0.0), (2, 1.0), (3, 2.0)]
    seen.clear()
    crash_at[0] = 3  # in the first batch of the third epoch, after three steps were written
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "b.pt", False)
    seen.clear()
    crash_at[0] = None
    resumed, again = run(tmp_path / "b.pt", True)
    assert seen == plan[2] and again["resumed_from_step"] == 3 and again["epochs"] == record["epochs"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))


def _jpeg(color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, "JPEG")
    return buf.getvalue()


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_group_members_by_key_and_read_images_by_offset(tmp_path):
    shard = tmp_path / "train-000.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "a/0001.jpg", _jpeg())
        _add(tar, "a/0001.txt", b"a red square.\na red box.\n")
        _add(tar, "a/0002.png", _jpeg((0, 0, 255)))  # a JPEG named .png decodes all the same
        _add(tar, "a/0002.json", json.dumps({"caption": "a blue square."}).encode())
        _add(tar, "a/0003.jpg", _jpeg())  # no caption: left out
    corpus = open_corpus(shard)
    assert isinstance(corpus, TarCorpus) and len(corpus) == 2 and corpus.skipped == 1
    assert corpus.captions(0) == ["a red square.", "a red box."] and corpus.captions(1) == ["a blue square."]
    rgb = corpus.load_rgb(1)
    assert rgb.shape == (48, 64, 3) and rgb[..., 2].mean() > 200
    assert len(open_corpus(str(tmp_path / "train-*.tar"))) == 2 and len(open_corpus(tmp_path)) == 2
    assert corpus.fingerprint(0) != corpus.fingerprint(1)


def test_caption_files_group_lines_per_image_and_say_what_is_wrong(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.jpg").write_bytes(_jpeg())
    lines = [{"image": "img/x.jpg", "caption": "a red square."}, {"image": "img/x.jpg", "captions": ["red."]}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    corpus = open_corpus(tmp_path)
    assert isinstance(corpus, CaptionFileCorpus) and len(corpus) == 1
    assert corpus.captions(0) == ["a red square.", "red."] and corpus.load_rgb(0).shape == (48, 64, 3)
    csv_file = tmp_path / "c.csv"
    csv_file.write_text("image,caption\nimg/x.jpg,a square\n")
    assert open_corpus(csv_file).captions(0) == ["a square"]
    (tmp_path / "bad.jsonl").write_text('{"image": "img/y.jpg", "caption": "gone"}\n')
    with pytest.raises(CorpusError, match="not found"):
        open_corpus(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text('{"image": "img/x.jpg", "caption": "ok"}\nnot json\n')
    with pytest.raises(CorpusError, match="bad2.jsonl:2: not a JSON line"):
        open_corpus(tmp_path / "bad2.jsonl")
    with pytest.raises(CorpusError, match="no such file"):
        open_corpus(tmp_path / "nothing-here")
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(CorpusError, match="not a readable tar"):
        open_corpus(tmp_path / "broken.tar")


# ------------------------------------------------------------------------------------- ovsegmentor runs

TINY = ["--max-images", "16", "--epochs", "3", "--batch-size", "8", "--no-ablation", "--no-eval",
        "--threshold-images", "2", "--device", "cpu"]


def _ovseg(args, env, torchrun: int = 0, wait=True):
    cmd = [sys.executable, "-m", "ovseg.app.cli", "train", "ovsegmentor", *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "ovseg.app.cli", "train", "ovsegmentor", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _weights(folder):
    return torch.load(folder / "model.pt", map_location="cpu", weights_only=False)["state"]


def _assert_same(a, b, atol, rtol=0.0):
    """Weights are saved in float16: rtol 2e-3 allows one float16 rounding step either way."""
    assert a.keys() == b.keys()
    excess = max(float(((a[k].float() - b[k].float()).abs() - atol - rtol * b[k].float().abs()).max()) for k in a)
    assert excess <= 0, f"weights differ by {excess} beyond the tolerance"


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "ovs"
    _ovseg([*TINY, "--coco", str(COCO_DEV), "--out", str(out)], env)
    return out


@pytest.mark.slow
def test_two_gloo_processes_train_the_weights_of_one(env, uninterrupted, tmp_path):
    out = tmp_path / "ovs2"
    _ovseg([*TINY, "--coco", str(COCO_DEV), "--out", str(out)], env, torchrun=2)
    one = json.loads((uninterrupted / "training.json").read_text())["networks"]["full"]["training"]
    two = json.loads((out / "training.json").read_text())["networks"]["full"]["training"]
    assert one["processes"] == 1 and two["processes"] == 2 and one["steps"] == two["steps"] == 3
    assert two["epochs"][-1]["lambda"] == 0.1 and two["epochs"][-1]["mask"] > 0  # the mask term ran, split too
    for a, b in zip(one["epochs"], two["epochs"]):
        assert a["contrast"] == pytest.approx(b["contrast"], abs=1e-3)
    _assert_same(_weights(uninterrupted), _weights(out), atol=1e-3, rtol=2e-3)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(env, uninterrupted, tmp_path):
    out = tmp_path / "ovs"
    state = tmp_path / "ovs.resume" / "full.pt"
    args = [*TINY, "--coco", str(COCO_DEV), "--out", str(out), "--checkpoint-every", "1"]
    proc = _ovseg(args, env, wait=False)
    kill_after_checkpoint(proc, state, min_step=1)
    assert not out.exists() and state.is_file()  # no half-written model folder
    _ovseg([*args, "--resume"], env)
    record = json.loads((out / "training.json").read_text())["networks"]["full"]["training"]
    assert 1 <= record["resumed_from_step"] < 3 and record["steps"] == 3
    assert not state.parent.exists()  # cleared once the run finished
    _assert_same(_weights(uninterrupted), _weights(out), atol=0.0)  # the very same weights


@pytest.mark.slow
def test_a_webdataset_shard_and_a_jsonl_corpus_train(env, tmp_path):
    from ovseg.train.coco import CocoConceptDataset

    dataset = CocoConceptDataset(COCO_DEV)
    ids = [i for i in dataset.image_ids if dataset.captions(i)][:8]
    shard = tmp_path / "shards" / "part-000.tar"
    shard.parent.mkdir()
    lines = []
    (tmp_path / "jsonl" / "images").mkdir(parents=True)
    with tarfile.open(shard, "w") as tar:
        for i in ids:
            data = dataset.image_path(i).read_bytes()
            _add(tar, f"{i:012d}.jpg", data)
            _add(tar, f"{i:012d}.json", json.dumps({"captions": dataset.captions(i)}).encode())
            (tmp_path / "jsonl" / "images" / f"{i}.jpg").write_bytes(data)
            lines += [json.dumps({"image": f"images/{i}.jpg", "caption": c}) for c in dataset.captions(i)]
    (tmp_path / "jsonl" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    for data, kind in ((str(tmp_path / "shards" / "*.tar"), "TarCorpus"), (str(tmp_path / "jsonl"), "CaptionFileCorpus")):
        out = tmp_path / f"out-{kind}"
        _ovseg(["--data", data, "--coco", str(COCO_DEV), "--out", str(out), "--epochs", "2", "--batch-size", "4",
                "--no-ablation", "--no-eval", "--threshold-images", "2", "--workers", "2"], env)
        summary = json.loads((out / "training.json").read_text())
        assert summary["data"]["corpus"].startswith(kind) and summary["data"]["images"] == 8
        assert summary["data"]["label_captioned_images"] == 0 and summary["data"]["captions"] >= 8 * 5
        epochs = summary["networks"]["full"]["training"]["epochs"]
        assert len(epochs) == 2 and all(0 < e["contrast"] < 10 for e in epochs)
