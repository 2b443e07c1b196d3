"""Nothing a user made is lost: the output-folder rules, the locks, Ctrl-C, and SIGKILL at random moments.

Every refusal is checked three ways: exit code 2 (or a PipelineError), a one-line message naming the
folder or file and why, and the user's files byte for byte as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, run_script, tiny_settings

from models.data.prepare import PrepareConfig, prepare
from models.data.synthetic import SyntheticSpec, make_synthetic
from models.errors import PipelineError
from models.io import MARKER, atomic_dir, output_lock, read_marker, sibling, write_marker

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, sends POSIX signals")

TINY_PREP = ["--size", "16x24", "--n_layers", "3"]
TINY_TRAIN = ["--config", "cpu", "--stack_sizes", "4,8", "--R0_channels", "3", "--nt", "4", "--batch_size", "2"]
TINY_TRAIN += ["--samples_per_epoch", "8", "--val_samples", "4", "--quiet"]


def tree(path: Path) -> dict[str, str] | None:
    """Every entry under `path` (hidden ones included) with the SHA-256 of each file: None when absent."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def is_complete(folder: Path, stage: str) -> bool:
    """A finished output: marked by `stage`, and holding exactly the files its marker lists."""
    marker = read_marker(folder)
    if not marker or marker["stage"] != stage or not marker.get("complete"):
        return False
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return files == sorted(marker["files"] + [MARKER])


def scored_table(folder: Path) -> Path:
    """A small df.pkl.gz as batch_scoring.py writes it, for fit_anoms.py (no model needed)."""
    rng = np.random.default_rng(0)
    rows = []
    for v in range(4):
        y = np.r_[np.zeros(15), np.ones(15)].astype(int)
        rows.append(
            pd.DataFrame(
                {
                    "video": f"Test{v + 1:03d}",
                    "frame": np.arange(1, 31),
                    "y": y,
                    "predictable": True,
                    "model_mse": y + rng.random(30),
                    "model_regularity": rng.random(30),
                }
            )
        )
    folder.mkdir(parents=True, exist_ok=True)
    df = pd.concat(rows, ignore_index=True)
    df.attrs = {"smooth": 1}
    df.to_pickle(folder / "df.pkl.gz")
    return folder


def ucsd_copy(synthetic_root: Path, dest: Path) -> Path:
    """The user's own dataset: a copy of the synthetic one without the pipeline's marker, plus a note."""
    shutil.copytree(synthetic_root, dest)
    (dest / MARKER).unlink(missing_ok=True)
    (dest / "my_notes.txt").write_text("mine\n")
    return dest


def model_folder(folder: Path) -> Path:
    """A model folder as train.py leaves it, for the refusals, which never get as far as loading the model."""
    (folder / "checkpoints").mkdir(parents=True)
    for name in ("model.keras", "history.csv", "history.png", "config.json", "checkpoints/last.keras"):
        (folder / name).write_text("stand-in\n")
    state = {"epoch": 1, "best": 0.1, "best_epoch": 1, "wait": 0, "monitor": "val_loss"}
    (folder / "checkpoints" / "last.json").write_text(json.dumps(state | {"frame_shape": [16, 24, 1], "nt": 4}))
    write_marker(folder, "train")
    return folder


# --- the table of refusals -------------------------------------------------------------------------------


def _prep(raw, pre, dataset, *extra, workers=1):
    return [
        "data_preparation.py",
        *("--raw_data", raw, "--preprocessed_data", pre, "--dataset", dataset),
        *(*TINY_PREP, "--workers", workers, *extra),
    ]


def _rows_data_preparation(ws: Path, synthetic_root: Path, prepared: Path):
    ucsd = ucsd_copy(synthetic_root, ws / "data" / "Ped")
    yield "prep: output is its own input", _prep(ws / "data", ws / "data", "Ped", "--overwrite"), "holds the input"
    yield (
        "prep: --dataset '' targets the whole preprocessed root",
        _prep(ucsd, ws / "data", "", "--overwrite"),
        "holds the input",
    )
    other = ws / "pre_root"
    shutil.copytree(prepared, other / "Other")
    yield (
        "prep: --dataset '' over a root of other datasets",
        _prep(ucsd, other, "", "--overwrite"),
        "not written by this pipeline",
    )
    real = ucsd_copy(synthetic_root, ws / "raw" / "UCSD_Anomaly_Dataset.v1p2" / "UCSDped2")
    (real.parent / "beside.txt").write_text("mine too\n")
    yield (
        "prep: --make_synthetic --overwrite over a real dataset",
        ["data_preparation.py", "--make_synthetic", "--overwrite", "--raw_data", ws / "raw", "--dataset", "UCSDped2"]
        + ["--size", "32x48"],
        f"Refusing to replace {real}: it was not written by this pipeline",
    )
    yield "prep: output inside the dataset", _prep(ws / "data", ucsd / "Train", "Ped", "--overwrite"), "lies inside"
    mine = ws / "pre" / "Ped"
    mine.mkdir(parents=True)
    (mine / "results.xlsx").write_text("a user's folder\n")
    yield (  # the first refusal already says why: --overwrite would not help
        "prep: user folder, no --overwrite",
        _prep(ws / "data", ws / "pre", "Ped"),
        "it was not written by this pipeline",
    )
    yield "prep: user folder with --overwrite", _prep(ws / "data", ws / "pre", "Ped", "--overwrite"), "no .prednet"
    shutil.copytree(prepared, ws / "pre2" / "Ped")
    (ws / "pre2" / "Ped" / "notes.txt").write_text("added by a user\n")
    yield "prep: user file in a pipeline folder", _prep(ws / "data", ws / "pre2", "Ped", "--overwrite"), "notes.txt"
    shutil.copytree(prepared, ws / "pre5" / "Ped")
    with open(ws / "pre5" / "Ped" / "metadata.json", "a") as f:
        f.write("\n")  # a user's edit of a file the pipeline wrote is theirs too
    yield (
        "prep: a user's edit of a file the pipeline wrote",
        _prep(ws / "data", ws / "pre5", "Ped", "--overwrite"),
        "metadata.json was not written by this pipeline, or changed since",
    )
    shutil.copytree(prepared, ws / "pre3" / "Ped")
    write_marker(ws / "pre3" / "Ped", "batch_scoring")
    yield (
        "prep: folder of another stage",
        _prep(ws / "data", ws / "pre3", "Ped", "--overwrite"),
        "holds the output of batch_scoring",
    )
    (ws / "pre4").mkdir()
    (ws / "pre4" / "Ped").write_text("a file\n")
    yield "prep: output is a file", _prep(ws / "data", ws / "pre4", "Ped", "--overwrite"), "is not a folder"


def _rows_scoring_and_anoms(ws: Path, prepared: Path):
    models = ws / "outputs" / "models"
    model_folder(models / "Syn")
    (ws / "outputs" / "anoms").mkdir()
    (ws / "outputs" / "anoms" / "keep.txt").write_text("keep\n")
    base = ["batch_scoring.py", "--preprocessed_data", prepared.parent, "--dataset", prepared.name, "--overwrite"]
    yield (
        "score: output holds the model",
        [*base, "--model_dir", models / "Syn", "--scored_data", ws / "outputs"],
        "holds the input",
    )
    yield "score: output is the data", [*base, "--model_dir", models / "Syn", "--scored_data", prepared], "is the input"
    yield (
        "score: output inside the model",
        [*base, "--model_dir", models / "Syn", "--scored_data", models / "Syn" / "s"],
        "lies inside the input",
    )
    scored = scored_table(ws / "scored")
    yield (
        "anoms: --model_path is --scored_data",
        ["fit_anoms.py", "--scored_data", scored, "--model_path", scored, "--overwrite"],
        "holds the input",
    )
    (scored / "anomaly_scores.csv").write_text("video,frame\nmine,1\n")
    anoms = ws / "anoms"
    anoms.mkdir()
    (anoms / "classifier.joblib").write_bytes(b"x")  # never read: the refusal comes first
    yield (
        "anoms: --apply over a user's anomaly_scores.csv",
        ["fit_anoms.py", "--apply", anoms, "--scored_data", scored],
        "not written by fit_anoms --apply",
    )
    yield (
        "anoms: --apply --overwrite over a user's anomaly_scores.csv",
        ["fit_anoms.py", "--apply", anoms, "--scored_data", scored, "--overwrite"],
        "not written by fit_anoms --apply",
    )
    old = ws / "scored_before"
    (old / "overlays").mkdir(parents=True)
    (old / "alarms.csv").write_text("video,start_frame\n")
    write_marker(old, "batch_scoring")
    (old / "my_annotations").mkdir()  # a user's folder, empty so far
    score = [*base, "--model_dir", models / "Syn", "--scored_data"]
    yield "score: a user's empty folder in the output", [*score, old], "my_annotations/ was not written"
    (ws / "latest").symlink_to(old)
    yield "score: output is a link", [*score, ws / "latest"], "is a symbolic link (to "
    yield (
        "train: --nb_epoch 0",
        ["train.py", "--nb_epoch", "0", "--model_dir", ws / "m0"],
        "argument --nb_epoch: must be 1 or more",
    )


def test_refusals_leave_everything_as_it_was(synthetic_root, prepared, tmp_path):
    """Each bad command: exit code 2, one line naming the folder and why, and no byte changed anywhere."""
    ws = tmp_path
    rows = [*_rows_data_preparation(ws, synthetic_root, prepared), *_rows_scoring_and_anoms(ws, prepared)]
    before = tree(ws)
    failures = []
    for name, cmd, message in rows:
        done = run_script(*cmd)
        lines = done.stderr.strip().splitlines()
        ok = done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
        if "usage:" not in done.stderr:  # argparse's own errors print the usage first
            ok = ok and len(lines) == 1
        if not ok:
            failures.append(f"{name}: exit {done.returncode}, {done.stderr.strip()[-500:]}")
        if tree(ws) != before:
            failures.append(f"{name}: changed the files")
            before = tree(ws)
    assert not failures, "\n".join(failures)
    print(f"{len(rows)} refused commands")


@pytest.fixture()
def other_size(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre8") / "Synthetic"
    prepare(synthetic_root, out, PrepareConfig(size=(8, 12), n_layers=3, val_fraction=0.34, workers=1))
    return out


def test_train_refusals_leave_everything_as_it_was(prepared, other_size, tmp_path):
    """The same for train.py's library function (a subprocess would import TensorFlow for each row)."""
    from models.training import staging_dir, train

    ws = tmp_path
    mine = ws / "mine"
    mine.mkdir()
    (mine / "model.keras").write_text("my own model\n")
    interrupted = ws / "interrupted"
    shutil.copytree(model_folder(ws / "a_model") / "checkpoints", staging_dir(interrupted) / "checkpoints")
    write_marker(staging_dir(interrupted), "train", complete=False)
    corrupt = model_folder(ws / "corrupt")
    (corrupt / "checkpoints" / "last.json").write_text("{not json")  # a file the marker lists, changed
    corrupt_run = ws / "corrupt_run"
    shutil.copytree(model_folder(ws / "b_model") / "checkpoints", staging_dir(corrupt_run) / "checkpoints")
    write_marker(staging_dir(corrupt_run), "train", complete=False)  # an interrupted run: no hashes yet
    (staging_dir(corrupt_run) / "checkpoints" / "last.json").write_text("{not json")
    noted = ws / "noted"  # an interrupted run that the user put notes in
    shutil.copytree(model_folder(ws / "c_model") / "checkpoints", staging_dir(noted) / "checkpoints")
    write_marker(staging_dir(noted), "train", complete=False)
    (staging_dir(noted) / "NOTES.txt").write_text("why this run was stopped")
    done = model_folder(ws / "done")
    rows = [
        ("model folder is the data", dict(model_dir=prepared, overwrite=True), "is the input"),
        ("model folder holds the data", dict(model_dir=prepared.parent, overwrite=True), "holds the input"),
        ("a user's folder", dict(model_dir=mine, overwrite=True), "not written by this pipeline"),
        ("a user's folder, --resume", dict(model_dir=mine, resume=True), "not written by this pipeline"),
        ("a user's folder, plain rerun", dict(model_dir=mine), "not written by this pipeline"),
        ("an interrupted run, plain rerun", dict(model_dir=interrupted), "pass --resume to continue it"),
        ("a finished model, plain rerun", dict(model_dir=done), "already holds a trained model"),
        ("nothing to resume", dict(model_dir=ws / "none", resume=True), "Nothing to resume"),
        ("changed last.json", dict(model_dir=corrupt, resume=True), "last.json was not written by this pipeline, or"),
        ("corrupt last.json", dict(model_dir=corrupt_run, resume=True), "last.json: it is missing or corrupt"),
        ("a user's note in a run, --overwrite", dict(model_dir=noted, overwrite=True), "NOTES.txt was not written by"),
        ("a user's note in a run, --resume", dict(model_dir=noted, resume=True), "NOTES.txt was not written by"),
        ("--nb_epoch 0", dict(model_dir=ws / "zero", nb_epoch=0), "--nb_epoch must be 1"),
    ]
    with output_lock(ws / "locked"):
        rows.append(("another run holds the lock", dict(model_dir=ws / "locked"), "holds the lock"))
        before = tree(ws)
        for name, overrides, message in rows:
            with pytest.raises(PipelineError, match=message) as err:
                train(tiny_settings(prepared, **overrides))
            assert "\n" not in str(err.value), name
            assert tree(ws) == before, name
    before = tree(ws)  # less the lock file, removed on release
    with pytest.raises(PipelineError, match=r"trained on frames \(16, 24, 1\).*the data has \(8, 12, 1\)"):
        train(tiny_settings(other_size, done, resume=True))
    assert tree(ws) == before
    print(f"{len(rows) + 1} refused train() calls")


def test_a_note_saved_in_a_training_run_s_folder_stops_it_and_is_kept(prepared, tmp_path):
    """Something saved in `.<name>.partial/` while train.py runs is never deleted with the old checkpoints nor
    carried into the model folder (whose next --overwrite would delete it): the run stops at its last saved
    epoch, one line naming it, and --resume finishes once it is moved away."""
    import keras

    from models.training import staging_dir, train

    class SaveNote(keras.callbacks.Callback):
        def __init__(self, path: Path, when: str):
            super().__init__()
            self.path, self.when = path, when

        def on_train_batch_end(self, batch, logs=None):  # in the second epoch (4 steps each)
            if self.when == "epoch 1" and self.model.optimizer.iterations.numpy() > 4 and not self.path.exists():
                self.path.write_text("mine")

        def on_train_end(self, logs=None):  # after the last epoch's checkpoints, before the model is put in place
            if self.when == "end":
                self.path.write_text("mine")

    for where, when in (("checkpoints/keep-epoch0.keras", "epoch 1"), ("NOTES.md", "end")):
        model_dir = tmp_path / when.replace(" ", "")
        note = staging_dir(model_dir) / where
        with pytest.raises(PipelineError, match=f"{where} was saved in .*partial while it trained; it is kept"):
            train(tiny_settings(prepared, model_dir), extra_callbacks=[SaveNote(note, when)])
        assert note.read_text() == "mine" and not model_dir.exists()
        note.rename(tmp_path / note.name)  # moved away: the run finishes
        train(tiny_settings(prepared, model_dir, resume=True))
        assert (model_dir / "model.keras").is_file() and not staging_dir(model_dir).exists()
        assert not (model_dir / note.name).exists() and not (model_dir / where).exists()
        assert (tmp_path / note.name).read_text() == "mine"


def _wait_for_lock(lock: Path, proc: subprocess.Popen) -> None:
    """Waits until the flock of `lock` is held (/proc/locks names its inode), or `proc` ends.

    The lock file exists a moment before its flock is taken: a run stopped in between holds nothing yet.
    """
    while proc.poll() is None:
        try:
            st = lock.stat()
        except FileNotFoundError:
            st = None
        if st is not None:
            inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
            for line in Path("/proc/locks").read_text().splitlines():
                fields = line.split()
                if "->" not in fields and fields[1] == "FLOCK" and fields[5] == inode:
                    return
        time.sleep(0.005)


def test_second_run_into_one_target_refuses_at_once(bigger_root, tmp_path):
    """Two data_preparation.py runs at once: the second stops in about its start-up time, naming the lock."""
    target = tmp_path / "pre" / bigger_root.name
    cmd = _prep(bigger_root.parent, tmp_path / "pre", bigger_root.name)
    first = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lock = sibling(target, ".lock")
    _wait_for_lock(lock, first)
    first.send_signal(signal.SIGSTOP)  # holds the lock as long as the second run needs
    try:
        assert first.poll() is None, first.stderr.read()
        start = time.perf_counter()
        second = run_script(*cmd)
        seconds = time.perf_counter() - start
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and f"Another run is writing {target}" in second.stderr and str(lock) in second.stderr
    assert first.wait(60) == 0 and is_complete(target, "data_preparation") and not lock.exists()
    print(f"second run refused in {seconds:.1f} s")


def test_atomic_dir_is_exclusive_and_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target, stage="demo") as tmp:
        (tmp / "a.txt").write_text("a")
        with pytest.raises(PipelineError, match="holds the lock"), atomic_dir(target, stage="demo"):
            pass
    assert is_complete(target, "demo") and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError), atomic_dir(target, True, stage="demo") as tmp:
        (tmp / "b.txt").write_text("b")
        raise RuntimeError("boom")
    assert (target / "a.txt").is_file() and not (target / "b.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a failed run into folders that did not exist removes those it made, unless something else wrote there
    nested = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError), atomic_dir(nested, stage="demo"):
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError), atomic_dir(nested, stage="demo"):
        (tmp_path / "new" / "mine.txt").write_text("a user's file, written meanwhile")
        raise RuntimeError("boom")
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["mine.txt"]


def test_only_what_a_killed_run_leaves_is_taken_for_its_leftovers(tmp_path):
    """An empty `.<name>.lock` or an `atomic_file` temporary file in an output folder is what a kill leaves; a
    lock-named file with content, or a lock-named folder, is the user's."""
    target = tmp_path / "out"
    with atomic_dir(target, stage="demo") as tmp:
        (tmp / "a.txt").write_text("a")
    (target / ".a.txt.lock").write_bytes(b"")
    (target / ".a.txt.tmp-ab12cd_3.txt").write_text("half")
    with atomic_dir(target, True, stage="demo") as tmp:  # both taken for leftovers: replaced
        (tmp / "a.txt").write_text("b")
    for name, make in [(".notes.lock", lambda p: p.write_text("mine")), (".keep.lock", Path.mkdir)]:
        make(target / name)
        with pytest.raises(PipelineError, match=name), atomic_dir(target, True, stage="demo"):
            pass
        assert (target / name).exists() and (target / "a.txt").read_text() == "b"
        shutil.rmtree(target / name) if (target / name).is_dir() else (target / name).unlink()
    # a user's file named like a temporary file: of a file that is not there, or with another suffix
    for name in (".paper.tmp-20241201.md", ".draft.md.tmp-abcd1234.md"):
        (target / name).write_text("mine")
        with pytest.raises(PipelineError, match=name.replace(".", r"\.")), atomic_dir(target, True, stage="demo"):
            pass
        assert (target / name).read_text() == "mine"
        (target / name).unlink()


def test_a_lock_path_that_is_not_an_empty_file_is_the_user_s(tmp_path):
    """The lock beside a target is an empty file: a file with something in it, a folder or a link there is the
    user's, refused in one line and left as it was (a run used to delete the file when it ended)."""
    target = tmp_path / "out"
    lock = sibling(target, ".lock")
    for make in (lambda p: p.write_text("my notes"), Path.mkdir, lambda p: p.symlink_to(tmp_path / "notes.txt")):
        (tmp_path / "notes.txt").write_text("notes")
        make(lock)
        with pytest.raises(PipelineError, match=r"\.out\.lock is in the way of the lock of .*out"), output_lock(target):
            pass
        assert (lock.read_text() == "my notes") if lock.is_file() and not lock.is_symlink() else lock.exists()
        assert (tmp_path / "notes.txt").read_text() == "notes" and not target.exists()
        shutil.rmtree(lock) if lock.is_dir() and not lock.is_symlink() else lock.unlink()
    with output_lock(target):  # an empty one a kill left is taken, and removed at the end
        pass
    assert not lock.exists()


def test_a_folder_this_account_may_not_write_is_refused_before_any_work(tmp_path, monkeypatch):
    """A read-only place for the output (its folder, or the output itself when it is replaced) is refused in
    one line by the checks every stage makes first (tested with os.access: the tests may run as root)."""
    from models.io import check_output

    target = tmp_path / "ro" / "out"
    with atomic_dir(target, stage="demo") as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    real = os.access
    for read_only in (target.parent, target, target / "sub"):  # a folder in it too: its files would stay
        monkeypatch.setattr(os, "access", lambda p, mode, ro=read_only: Path(p) != ro and real(p, mode))
        with pytest.raises(PipelineError, match=f"Cannot write .*out: no permission to write in {read_only}"):
            check_output(target, "demo", overwrite=True)
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != target.parent and real(p, mode))
    with pytest.raises(PipelineError, match="no permission to write in"):
        check_output(target.parent / "new", "demo")


@pytest.mark.parametrize(
    "meanwhile",
    [
        lambda target: (target / "NOTES.txt").write_text("mine"),
        lambda target: (target / "a.txt").write_text("annotated"),
        lambda target: (target / "my_annotations").mkdir(),
        lambda target: shutil.copytree(target, target / "backup"),  # holds a marker of its own
    ],
    ids=["note added", "file edited", "folder made", "backup copied in"],
)
def test_what_the_user_does_to_the_target_during_the_run_stops_the_replacement(tmp_path, meanwhile):
    """The target is checked again when the run ends, not only when it starts (a scoring run can take an hour):
    it stays as the user left it, and the run's output is set aside beside it, named in the error."""
    target = tmp_path / "out"
    with atomic_dir(target, stage="demo") as tmp:
        (tmp / "a.txt").write_text("old")
    changed = r"out changed while this run worked \(.*\), so it is left as it is; this run's output is in .*out\.new-"
    with pytest.raises(PipelineError, match=changed), atomic_dir(target, True, stage="demo") as tmp:
        (tmp / "a.txt").write_text("new")
        meanwhile(target)
    before = tree(target)
    assert before and (target / MARKER).is_file()  # as the user left it
    kept = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert len(kept) == 1 and kept[0].name.startswith("out.new-") and is_complete(kept[0], "demo")
    assert (kept[0] / "a.txt").read_text() == "new"


def test_a_folder_that_appears_at_the_target_during_a_run_without_overwrite_stays(tmp_path):
    """Without --overwrite nothing is replaced, even a folder of the pipeline's that appeared meanwhile."""
    target, earlier = tmp_path / "out", tmp_path / "earlier"
    with atomic_dir(earlier, stage="demo") as tmp:
        (tmp / "a.txt").write_text("restored")
    with (
        pytest.raises(PipelineError, match=r"already exists; pass --overwrite"),
        atomic_dir(target, stage="demo") as tmp,
    ):
        (tmp / "a.txt").write_text("new")
        shutil.copytree(earlier, target)  # the user restores a backup there meanwhile
    assert (target / "a.txt").read_text() == "restored"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.new-")]
    assert len(kept) == 1 and (kept[0] / "a.txt").read_text() == "new"


# --- Ctrl-C and kills ------------------------------------------------------------------------------------


def _live_processes_mentioning(text: str) -> list[int]:
    """Processes (not zombies) whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (from /proc/PID/task/*/children, else by scanning /proc)."""
    tasks = list(Path(f"/proc/{pid}/task").glob("*/children"))
    if tasks:
        out = []
        for task in tasks:
            try:
                out += [int(c) for c in task.read_text().split()]
            except OSError:
                continue
        return out
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


@pytest.fixture(scope="module")
def bigger_root(tmp_path_factory) -> Path:
    """Large enough sources that decoding takes a moment: 6 videos of 60 frames at 72x108."""
    spec = SyntheticSpec(height=72, width=108, train_videos=4, test_videos=2, frames=60, seed=2)
    return make_synthetic(tmp_path_factory.mktemp("bigraw"), "Big", spec)


def test_sigkill_leaves_no_decoding_workers(bigger_root, tmp_path):
    """SIGKILL while decoding: the decoding processes end with the run (tried again if a run ends first)."""
    for attempt in range(3):
        out = tmp_path / f"pre{attempt}"
        cmd = [sys.executable, *map(str, _prep(bigger_root.parent, out, bigger_root.name, workers=2))]
        log = tmp_path / f"err{attempt}.log"
        with open(log, "w") as err:  # not a pipe: a surviving worker would hold it open
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        while len(_children(proc.pid)) < 2 and proc.poll() is None:
            time.sleep(0.002)
        workers = _children(proc.pid)
        proc.kill()
        if proc.wait() == 0:  # it ended before its workers were seen
            continue
        assert proc.returncode == -signal.SIGKILL and len(workers) >= 2, log.read_text()
        for _ in range(100):
            left = _live_processes_mentioning(str(out))
            if not left:
                break
            time.sleep(0.05)
        assert not left, f"orphans {left} of workers {workers}"
        assert not (out / "Big").exists()
        break
    else:
        pytest.fail("every run ended before its workers were seen")


def test_ctrl_c_prints_one_line(bigger_root, tmp_path):
    """Ctrl-C in a terminal interrupts the whole process group: one line, exit code 130, nothing left.

    The run is paused once its decoding processes exist, so that the signal finds it decoding; a run that
    still ended first (a loaded machine) is tried again.
    """
    out = tmp_path / "pre"
    cmd = [sys.executable, *map(str, _prep(bigger_root.parent, out, bigger_root.name, workers=2))]
    for _ in range(3):
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
        while len(_children(proc.pid)) < 2 and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.5)  # the workers start (and learn to ignore Ctrl-C) meanwhile
        os.killpg(proc.pid, signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode == 0:
            shutil.rmtree(out)
            continue
        assert proc.returncode == 130 and err.strip() == "interrupted", err
        assert not out.exists(), list(out.iterdir())  # nothing, not even the folder the run made for its output
        break
    else:
        pytest.fail("every run ended before Ctrl-C")


# --- fault injection: SIGKILL at seeded random moments ---------------------------------------------------

KILLS = 3  # per stage


def _run_killed(cmd, target: Path, delay: float, log: Path, while_locked=None) -> tuple[bool, float]:
    """Runs `cmd`, and SIGKILLs it `delay` seconds after it takes the lock of `target`, unless it ended first.

    Returns:
        Whether it was killed, and how long it held the lock.
    """
    lock = sibling(target, ".lock")
    lock.unlink(missing_ok=True)  # a killed run's lock file: nothing holds it any more
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _wait_for_lock(lock, proc)
        locked = time.monotonic()
        if while_locked is not None and proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)
            try:
                while_locked()
            finally:
                proc.send_signal(signal.SIGCONT)
            locked = time.monotonic()
        while proc.poll() is None and time.monotonic() < locked + delay:
            time.sleep(0.005)
        killed = proc.poll() is None
        if killed:
            proc.kill()
        code = proc.wait()
    assert killed or code == 0, log.read_text()[-3000:]
    return killed, time.monotonic() - locked


def _inject(cmd_for, target: Path, stage: str, span: float, tmp_path: Path, seed: int, while_locked=None) -> int:
    """Runs `cmd_for()` until KILLS of its runs were killed at seeded random moments of their work (`span`
    seconds at first; after a run that ended first, most of what it took). After each run, `target` is as it
    was or complete, and no process of the run is left."""
    rng = np.random.default_rng(seed)
    kills = runs = 0
    while kills < KILLS and runs < KILLS + 4:
        before = tree(target)
        delay = float(rng.uniform(0.05, 1.0)) * span
        log = tmp_path / f"run{runs}.log"
        killed, held = _run_killed(cmd_for(), target, delay, log, while_locked if runs == 0 else None)
        runs += 1
        kills += killed
        if not killed:
            span = 0.9 * held
        assert tree(target) == before or is_complete(target, stage), f"run {runs} killed after {delay:.2f} s"
        for _ in range(100):
            if not _live_processes_mentioning(str(tmp_path)):
                break
            time.sleep(0.05)
        assert not _live_processes_mentioning(str(tmp_path)), f"processes left after run {runs}"
    assert kills == KILLS, f"{kills} of {runs} runs killed"
    print(f"{stage}: {kills} kills survived in {runs} runs")
    return kills


def test_kills_data_preparation(bigger_root, tmp_path):
    target = tmp_path / "pre" / "Big"
    cmd = _prep(bigger_root.parent, tmp_path / "pre", "Big", "--overwrite", workers=2)
    _inject(lambda: cmd, target, "data_preparation", 1.0, tmp_path, seed=1)
    done = run_script(*cmd)
    assert done.returncode == 0, done.stderr
    assert is_complete(target, "data_preparation") and sorted(p.name for p in target.parent.iterdir()) == ["Big"]


@pytest.fixture(scope="module")
def model_after_kills(prepared, tmp_path_factory) -> Path:
    """train.py killed KILLS times at random moments (each time resumed, or started over), then finished."""
    from models.training import staging_dir

    tmp_path = tmp_path_factory.mktemp("train_kills")
    model_dir = tmp_path / "m"
    staging = staging_dir(model_dir)
    base = ["train.py", *TINY_TRAIN, "--nb_epoch", "2", "--model_dir", model_dir]
    base += ["--preprocessed_data", prepared.parent, "--dataset", prepared.name]

    def cmd():
        if staging.exists():
            return [*base, "--resume"]
        return [*base, "--overwrite"] if model_dir.exists() else base

    def second_run():  # what a second train.py into the same folder meets first, while this one runs
        with pytest.raises(PipelineError, match="holds the lock"), output_lock(model_dir):
            pass

    _inject(cmd, model_dir, "train", 8.0, tmp_path, seed=2, while_locked=second_run)
    if staging.exists() or not model_dir.exists():
        done = run_script(*cmd())
        assert done.returncode == 0, done.stderr[-3000:]
    return model_dir


def test_kills_train_then_resume(model_after_kills):
    from models.training import staging_dir

    model_dir = model_after_kills
    assert is_complete(model_dir, "train") and not staging_dir(model_dir).exists()
    assert sorted(p.name for p in model_dir.parent.iterdir() if p.suffix != ".log") == ["m"]
    assert pd.read_csv(model_dir / "history.csv")["epoch"].tolist() == [0, 1]  # resumed runs add no row twice
    config = json.loads((model_dir / "config.json").read_text())
    assert config["results"]["epochs_total"] == 2


def test_kills_batch_scoring(prepared, model_after_kills, tmp_path):
    target = tmp_path / "scored"
    cmd = ["batch_scoring.py", "--preprocessed_data", prepared.parent, "--dataset", prepared.name]
    cmd += ["--model_dir", model_after_kills, "--scored_data", target, "--overwrite", "--smooth", "3", "--n_plot", "2"]
    _inject(lambda: cmd, target, "batch_scoring", 1.5, tmp_path, seed=3)
    done = run_script(*cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert is_complete(target, "batch_scoring") and (target / "df.pkl.gz").is_file()


def test_kills_fit_anoms(tmp_path):
    scored = scored_table(tmp_path / "scored")
    target = tmp_path / "anoms"
    cmd = ["fit_anoms.py", "--scored_data", scored, "--model_path", target, "--overwrite", "--n_splits", "2"]
    _inject(lambda: cmd, target, "fit_anoms", 1.5, tmp_path, seed=4)
    done = run_script(*cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert is_complete(target, "fit_anoms")
    # --apply writes anomaly_scores.csv beside the scores once, and replaces it only with --overwrite
    import fit_anoms

    apply = ["--apply", str(target), "--scored_data", str(scored)]
    assert fit_anoms.main(apply) == 0
    with pytest.raises(PipelineError, match="anomaly_scores.csv already exists"):
        fit_anoms.main(apply)
    assert fit_anoms.main([*apply, "--overwrite"]) == 0
    assert len(pd.read_csv(scored / "anomaly_scores.csv")) == 120
