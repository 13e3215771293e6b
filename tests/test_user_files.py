"""The command-line programs as a user meets them with real files: no user file is ever replaced,
outputs of earlier runs are recognised, every bad setting or place is one line before any work,
and --resume continues a run on its own settings."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import (REPO, colorful_rgb, load_script, make_photos, run_colorize, run_train, save_image, script_env,
                      tiny_weights, with_closed_stdout)
from nanocolor import evaluate, infer, serialize
from nanocolor.color import rgb_to_lab
from nanocolor.serialize import load_npz

train_cli = load_script("train.py", "train_cli")


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    return make_photos(tmp_path_factory.mktemp("photos"), 12)


def tiny_train(photo_folder: Path) -> list:
    return ["--data", photo_folder, "--size", "8", "--batch-size", "2", "--widths", "4,8", "--quiet"]


def run_train_here(capsys, *args) -> tuple[int, list[str]]:
    """train.py's main in this process (so that the test can fake the disk): (exit code, stderr lines)."""
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        code = train_cli.main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return code, capsys.readouterr().err.splitlines()


# -- colorize.py: outputs ------------------------------------------------------------------------

def test_outputs_never_replace_an_input_or_a_file_colorize_did_not_write(tmp_path, capsys):
    """Defect: `--output s` over s/x.jpg + s/x.png wrote x.jpg's colors into the user's x.png;
    --compare over c/x.jpg replaced the user's c/x_compare.png."""
    weights = tiny_weights(tmp_path / "w.npz")
    s = tmp_path / "s"
    save_image(s / "x.jpg", colorful_rgb(8, 8), quality=95)
    user_png = save_image(s / "x.png", colorful_rgb(8, 8, seed=1))
    c = tmp_path / "c"
    save_image(c / "x.jpg", colorful_rgb(8, 8, seed=2), quality=95)
    user_compare = save_image(c / "x_compare.png", colorful_rgb(8, 8, seed=3))
    user_output = save_image(tmp_path / "p_color.png", colorful_rgb(8, 8, seed=4))  # not colorize's
    photo = save_image(tmp_path / "p.png", colorful_rgb(8, 8, seed=5))
    originals = {p: p.read_bytes() for p in (user_png, user_compare, user_output)}

    for args in ([s, "--output", s], [c, "--compare"], [photo]):
        code, stdout, err = run_colorize(capsys, *args, "--weights", weights)
        assert code == 0, err
    assert {p: p.read_bytes() for p in originals} == originals
    assert sorted(p.name for p in s.iterdir()) == ["x.jpg", "x.png", "x_jpg.png", "x_png.png"]
    assert (c / "x_color.png").is_file() and (c / "x_compare_2.png").is_file()
    assert (tmp_path / "p_png_color.png").is_file()  # p_color.png is the user's: a distinct name


def test_a_second_run_on_a_folder_skips_the_first_runs_outputs(tmp_path, capsys):
    """Defect: colorizing a folder twice colorized its own outputs (x_color_color.png)."""
    weights = tiny_weights(tmp_path / "w.npz")
    folder = tmp_path / "scans"
    save_image(folder / "x.png", colorful_rgb(8, 8))
    save_image(folder / "y.jpg", colorful_rgb(8, 8, seed=1), quality=95)
    for run in range(2):
        code, stdout, err = run_colorize(capsys, folder, "--compare", "--weights", weights)
        assert code == 0, err
    assert "skipped 4 earlier outputs of colorize.py" in stdout
    assert sorted(p.name for p in folder.iterdir()) == ["x.png", "x_color.png", "x_compare.png", "y.jpg",
                                                         "y_color.png", "y_compare.png"]


def test_folders_are_searched_recursively_and_mirrored_under_output(tmp_path, capsys):
    """Defect: colorize.py DIR did not recurse (train and evaluate do); a/x.png and b/x.png must
    not collide under --output."""
    weights = tiny_weights(tmp_path / "w.npz")
    top = tmp_path / "photos"
    a = save_image(top / "a" / "x.png", colorful_rgb(8, 8))
    b = save_image(top / "b" / "deeper" / "x.png", colorful_rgb(8, 8, seed=1))
    out = tmp_path / "out"
    code, stdout, err = run_colorize(capsys, top, "--output", out, "--weights", weights)
    assert code == 0, err
    assert f"{a} -> {out / 'a' / 'x.png'}" in stdout and f"{b} -> {out / 'b' / 'deeper' / 'x.png'}" in stdout
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["a/x.png", "b/deeper/x.png"]


def test_an_unreadable_folder_is_one_line_and_the_other_inputs_are_done(tmp_path, capsys, monkeypatch):
    """Defect: a folder that cannot be listed gave a traceback and nothing was colorized."""
    weights = tiny_weights(tmp_path / "w.npz")
    locked, other = tmp_path / "locked", tmp_path / "other"
    save_image(locked / "x.png", colorful_rgb(8, 8))
    photo = save_image(other / "y.png", colorful_rgb(8, 8, seed=1))
    real_scandir = os.scandir

    def scandir(path="."):  # what a folder without read permission does (tests may run as root)
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    code, stdout, err = run_colorize(capsys, locked, other, "--weights", weights)
    assert code == 1
    assert err[0] == f"colorize.py: error: {locked}: cannot read this folder (Permission denied)"
    assert err[-1] == "colorize.py: 1 of 2 inputs failed" and len(err) == 2
    assert f"{photo} ->" in stdout and (other / "y_color.png").is_file()


def test_bad_output_and_weights_places_are_one_line_before_any_work(tmp_path, capsys):
    """Defects: --weights DIR said 'no such file'; --output x.png silently made a folder x.png;
    --output FILE repeated one error per image."""
    weights = tiny_weights(tmp_path / "w.npz")
    photo = save_image(tmp_path / "p.png", colorful_rgb(8, 8))
    other = save_image(tmp_path / "q.png", colorful_rgb(8, 8, seed=1))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    cases = [(["--weights", tmp_path], "is a folder"),
             (["--weights", weights, "--output", tmp_path / "x.png"], "looks like a file name"),
             (["--weights", weights, "--output", a_file], "is a file, not a folder"),
             (["--weights", weights, "--work-size", 3000], "memory grows with its square"),
             (["--weights", weights, "--chroma-gain", -1], "--chroma-gain must be at least 0")]
    for args, reason in cases:
        code, stdout, err = run_colorize(capsys, photo, other, *args)
        assert code == 2 and len(err) == 1 and reason in err[0], (args, err)
        assert stdout == ""
    assert not (tmp_path / "x.png").exists() and a_file.read_text() == "keep me"
    assert not (tmp_path / "p_color.png").exists()
    code, _, err = run_colorize(capsys, photo, "--weights", weights, "--work-size", 1024)
    assert code == 0, err  # the cap itself is allowed


def test_an_animated_gif_says_only_its_first_frame_is_colorized(tmp_path, capsys):
    """Defect: a GIF's first frame was used silently."""
    frames = [Image.fromarray(colorful_rgb(8, 10, seed=i)) for i in range(3)]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    still = tmp_path / "still.gif"
    frames[0].save(still)
    code, _, err = run_colorize(capsys, gif, still, "--weights", tiny_weights(tmp_path / "w.npz"))
    assert code == 0
    assert err == [f"colorize.py: warning: {gif} has 3 frames; only the first was colorized"]
    assert (tmp_path / "anim_color.png").is_file() and (tmp_path / "still_color.png").is_file()


# -- evaluate --------------------------------------------------------------------------------------

def test_evaluate_prints_the_scores_before_a_bad_gallery_fails(tmp_path, capsys, photo_folder):
    """Defect: --gallery BADPATH computed every score, then printed none."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = evaluate.main(["--data", str(photo_folder), "--weights", str(tiny_weights(tmp_path / "w.npz")),
                          "--gallery", str(blocker / "gallery.png"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 2
    assert "12 color photos" in captured.out and "model" in captured.out
    errors = captured.err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("evaluate: error: cannot write the gallery")


def test_evaluate_off_a_terminal_writes_a_few_plain_progress_lines(tmp_path, capsys):
    """Defect: with stderr in a file, every tqdm redraw became a line (~220 for 1,100 photos)."""
    folder = make_photos(tmp_path / "many", 40, size=8)
    code = evaluate.main(["--data", str(folder), "--weights", str(tiny_weights(tmp_path / "w.npz"))])
    captured = capsys.readouterr()
    assert code == 0 and not sys.stderr.isatty()
    lines = captured.err.splitlines()
    assert "\r" not in captured.err and 1 <= len(lines) <= 10, lines
    assert lines[-1] == "evaluating: 40/40 photos"


# -- train.py --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,reason", [
    (["--limit", "0"], "--limit must be at least 1, got 0"),
    (["--limit", "-15"], "--limit must be at least 1, got -15"),
    (["--lr", "inf"], "--lr must be finite and above 0, got inf"),
    (["--lr", "nan"], "--lr must be finite"),
    (["--lr", "0"], "--lr must be above 0"),
    (["--val-fraction", "1"], "--val-fraction must be at least 0 and below 1"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--widths", "4,x"], "--widths must be positive integers"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_train_numeric_options_are_checked_up_front(tmp_path, args, reason):
    """Defects: --limit 0 and -15 were accepted (-15 trained on all but 15 photos); --lr inf
    flooded stderr with NumPy warnings. The data folder does not exist: the option is found first."""
    result = run_train("--data", tmp_path / "nowhere", "--out", tmp_path / "run", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"train.py: error: {result.stderr.split('error: ')[1].strip()}"]
    assert reason in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("place", ["file", "under_file"])
def test_train_checks_its_output_place_before_reading_photos(tmp_path, place):
    """Defect: --out FILE ended in a traceback after the whole dataset was loaded. The data folder
    does not exist, so an error naming the output place proves it was checked first."""
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    out = blocker if place == "file" else blocker / "run"
    result = run_train("--data", tmp_path / "nowhere", "--out", out, "--epochs", 1, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()] and f"error: {blocker}:" in result.stderr
    assert blocker.read_text() == "keep me"


def refuse_writes_in(monkeypatch, folder: Path) -> None:
    """Make the OS refuse new files in `folder`, as it does without write permission: permissions
    cannot be relied on (tests may run as root), so the refusal is faked."""
    real_open = os.open

    def refusing_open(path, *args, **kwargs):
        if folder in (Path(path), Path(path).parent):  # a file in it, or O_TMPFILE on it
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", refusing_open)


def test_train_on_an_unwritable_folder_is_one_line(tmp_path, capsys, photo_folder, monkeypatch):
    parent = tmp_path / "readonly"
    parent.mkdir()
    refuse_writes_in(monkeypatch, parent)
    code, err = run_train_here(capsys, *tiny_train(photo_folder), "--out", parent / "run", "--epochs", 1)
    assert code == 2 and err == [f"train.py: error: {parent}: cannot write there (Permission denied)"]


def test_a_full_disk_is_one_line_naming_the_path_and_keeps_the_last_checkpoint(tmp_path, capsys,
                                                                                photo_folder, monkeypatch):
    """Defect: an OSError while saving ended in a traceback."""
    run = tmp_path / "run"
    code, err = run_train_here(capsys, *tiny_train(photo_folder), "--out", run, "--epochs", 1)
    assert code == 0, err
    good = load_npz(run / "checkpoint.npz")[0]

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(serialize.os, "fsync", full)
    code, err = run_train_here(capsys, *tiny_train(photo_folder), "--resume", run, "--epochs", 2)
    monkeypatch.undo()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"train.py: error: {run}: No space left on device; "
                      f"the last checkpoint, {run / 'checkpoint.npz'}, is kept")
    arrays, meta = load_npz(run / "checkpoint.npz")
    assert meta["epoch"] == 1 and all(np.array_equal(arrays[k], good[k]) for k in good)
    assert not list(run.glob(".*.tmp"))


def test_resume_continues_the_runs_own_settings_and_names_what_it_ignores(tmp_path, photo_folder):
    """Defect: --resume of a run started with --epochs 2 trained to 50, and --size, --lr, ...
    given with --resume were ignored silently. The data path is stored absolute, so a resume from
    another working folder finds the photos."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    (here / "photos").symlink_to(photo_folder)
    run = tmp_path / "run"
    result = run_train("--data", "photos", "--size", "8", "--batch-size", "2", "--widths", "4,8", "--quiet",
                       "--out", run, "--epochs", 1, cwd=here)
    assert result.returncode == 0, result.stderr
    result = run_train("--resume", run, "--quiet", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert load_npz(run / "checkpoint.npz")[1]["epoch"] == 1  # its own 1 epoch, not 50
    assert result.stderr == ""
    result = run_train("--resume", run, "--epochs", 2, "--size", "16", "--lr", "0.5", "--batch-size", "2",
                       "--quiet", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("train.py: warning: --resume continues"), warnings
    assert "--size 16 (the run has 8)" in warnings[0] and "--lr 0.5 (the run has 0.001)" in warnings[0]
    assert "--batch-size" not in warnings[0]  # the same as the run's: nothing ignored
    _, meta = load_npz(run / "checkpoint.npz")
    assert meta["epoch"] == 2 and meta["train_config"]["size"] == 8 and meta["train_config"]["epochs"] == 2


# -- second round: no command replaces a user's file, every odd input is one line ----------------

def colorize_stdin(photo: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    """`nanocolor colorize - ARGS < photo`, as a shell runs it (stdin is the photo file itself)."""
    with open(photo, "rb") as stdin:
        return subprocess.run([sys.executable, "-m", "nanocolor", "colorize", "-", *map(str, args)], stdin=stdin,
                              capture_output=True, cwd=cwd, env=script_env(), timeout=120)


def test_stdin_never_replaces_a_users_file_nor_the_input(tmp_path):
    """Defect: `colorize - --output mine.png < photo` replaced the user's mine.png, and
    `colorize - --output x.png < x.png` replaced the input photo itself (exit 0 both)."""
    weights = tiny_weights(tmp_path / "w.npz")
    photo = save_image(tmp_path / "x.png", colorful_rgb(8, 8))
    mine = save_image(tmp_path / "dir" / "mine.png", colorful_rgb(8, 8, seed=1))
    originals = {p: p.read_bytes() for p in (photo, mine)}
    itself = "it is the input itself (stdin); refusing to overwrite it"
    for target, extra, reason in [(mine, [], "exists and colorize.py did not write it; --overwrite replaces it"),
                                  (photo, [], itself), (photo, ["--overwrite"], itself)]:
        result = colorize_stdin(photo, "--output", target, "--weights", weights, *extra, cwd=tmp_path)
        err = result.stderr.decode()
        assert result.returncode == 2 and err == f"colorize.py: error: {target}: {reason}\n", err
    assert {p: p.read_bytes() for p in originals} == originals
    result = colorize_stdin(photo, "--output", mine, "--weights", weights, "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert mine.read_bytes() != originals[mine] and Image.open(mine).size == (8, 8)
    again = colorize_stdin(photo, "--output", mine, "--weights", weights, cwd=tmp_path)
    assert again.returncode == 0, again.stderr.decode()  # now an output of colorize.py: replaced like one


def test_stdin_compare_is_written_beside_the_output_or_refused(tmp_path):
    """Defect: `colorize - --compare` dropped the compare picture silently."""
    weights = tiny_weights(tmp_path / "w.npz")
    photo = save_image(tmp_path / "x.png", colorful_rgb(8, 10))
    refused = colorize_stdin(photo, "--compare", "--weights", weights, cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == b""
    assert refused.stderr.decode() == ("colorize.py: error: --compare with - needs --output FILE: "
                                       "stdout takes the colorized PNG alone\n")
    result = colorize_stdin(photo, "--compare", "--output", tmp_path / "out" / "c.png", "--weights", weights,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert Image.open(tmp_path / "out" / "c.png").size == (10, 8)
    assert Image.open(tmp_path / "out" / "c_compare.png").size == (3 * 10 + 2 * 4, 8)  # three panels, 4 px gaps


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_colorize_a_folder_into_a_closed_pipe_writes_every_photo_and_fails_none(tmp_path, buffered):
    """Defect: `colorize.py DIR --output OUT | head -1` said "47 of 48 inputs failed ... Broken pipe"
    and exited 1 although every PNG was written: stdout only lists the work."""
    folder = make_photos(tmp_path / "scans", 3, size=8)
    result = with_closed_stdout([REPO / "colorize.py", folder, "--output", tmp_path / "out", "--weights",
                                 tiny_weights(tmp_path / "w.npz")], buffered, cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000.png", "001.png", "002.png"]


def test_an_unwritable_output_folder_is_one_line_without_temporary_names(tmp_path, capsys, monkeypatch):
    """Defects: a folder that refused the outputs gave one error per photo, each naming a temporary
    file (.x_color.png.t9w3w1s5.tmp)."""
    weights = tiny_weights(tmp_path / "w.npz")
    locked = make_photos(tmp_path / "locked", 3, size=8)
    other = make_photos(tmp_path / "other", 1, size=8)
    refuse_writes_in(monkeypatch, locked)
    code, stdout, err = run_colorize(capsys, locked, other, "--weights", weights)
    assert code == 1
    assert err == [f"colorize.py: error: {locked}: cannot write there (Permission denied); 3 inputs not colorized",
                   "colorize.py: 3 of 4 inputs failed"]
    assert stdout == f"{other / '000.png'} -> {other / '000_color.png'}\n"
    with pytest.raises(PermissionError) as refused:  # where a write fails after all, it names its target
        serialize.atomic_write_bytes(locked / "x.png", b"data")
    assert refused.value.filename == str(locked / "x.png") and ".tmp" not in str(refused.value)
    assert sorted(p.name for p in locked.iterdir()) == ["000.png", "001.png", "002.png"]


def test_the_work_size_never_exceeds_the_photo(tmp_path, capsys, monkeypatch):
    """Defect: --work-size 1024 on a 1x1 image ran the network at 1024x1024 (700 MB)."""
    shapes = []
    real_forward = infer.ColorNet.forward
    monkeypatch.setattr(infer.ColorNet, "forward",
                        lambda model, x: (shapes.append(x.shape), real_forward(model, x))[1])
    tiny = save_image(tmp_path / "dot.png", colorful_rgb(1, 1))
    wide = save_image(tmp_path / "wide.png", colorful_rgb(20, 41))
    code, _, err = run_colorize(capsys, tiny, wide, "--weights", tiny_weights(tmp_path / "w.npz"),
                                "--work-size", 1024, "--conv", "im2col")  # the textbook: ColorNet.forward runs
    assert code == 0, err
    assert shapes == [(1, 2, 2, 1), (1, 20, 40, 1)]  # the photo's own size, in multiples of 2 (widths 4,8)
    assert Image.open(tmp_path / "dot_color.png").size == (1, 1)


def test_train_never_writes_over_the_users_files_nor_into_its_data(tmp_path, capsys, photo_folder):
    """Defects: --out DIR holding the user's own log.csv, preview.png, model.npz (no checkpoint.npz)
    overwrote them without a word; --out inside a --data folder made the next run train on its own
    preview.png."""
    mine = tmp_path / "mine"
    for name in ("log.csv", "model.npz", "preview.png"):
        (mine / name).parent.mkdir(exist_ok=True)
        (mine / name).write_text(f"the user's {name}")
    code, err = run_train_here(capsys, *tiny_train(photo_folder), "--out", mine, "--epochs", 1)
    assert code == 2 and err == [f"train.py: error: {mine} already holds files (log.csv, model.npz, preview.png) "
                                 f"and no run of train.py: pick a new or empty --out"]
    assert {p.name: p.read_text() for p in mine.iterdir()} == {
        name: f"the user's {name}" for name in ("log.csv", "model.npz", "preview.png")}
    for out in (photo_folder, photo_folder / "runs" / "a"):
        code, err = run_train_here(capsys, *tiny_train(photo_folder), "--out", out, "--epochs", 1)
        assert code == 2 and len(err) == 1 and f"is inside the data folder {photo_folder}" in err[0], err
    assert sorted(p.name for p in photo_folder.iterdir()) == [f"{i:03d}.png" for i in range(12)]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_train_here(capsys, *tiny_train(photo_folder), "--out", empty, "--epochs", 1)
    assert code == 0, err  # an empty folder the user made is fine
    assert (empty / "checkpoint.npz").is_file()


def test_resume_refuses_another_out_and_init_and_an_epoch_count_already_passed(tmp_path, capsys, photo_folder):
    """Defects: --resume RUN --out OTHER ignored --out and rewrote RUN's model.npz, preview.png and
    curves.png; --init with --resume was ignored; --resume RUN --epochs 2 on a run past 2 epochs
    printed "done: 2 epochs" and did nothing."""
    run = tmp_path / "run"
    code, err = run_train_here(capsys, *tiny_train(photo_folder), "--out", run, "--epochs", 2)
    assert code == 0, err
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    weights = tiny_weights(tmp_path / "w.npz")
    cases = [(["--out", tmp_path / "other", "--epochs", 3], f"--out {tmp_path / 'other'} with --resume {run}: "
                                                            f"a run is continued in its own folder"),
             (["--init", weights, "--epochs", 3], "--init and --resume do not go together"),
             (["--epochs", 1], f"{run} has already trained 2 epochs: --epochs 1 leaves nothing to do")]
    for args, reason in cases:
        code, err = run_train_here(capsys, "--resume", run, "--quiet", *args)
        assert code == 2 and len(err) == 1 and err[0].startswith(f"train.py: error: {reason}"), err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files
    assert not (tmp_path / "other").exists()
    code, err = run_train_here(capsys, "--resume", run, "--out", run, "--epochs", 3, "--quiet")
    assert code == 0 and err == []  # --out naming the run itself is no conflict
    assert load_npz(run / "checkpoint.npz")[1]["epoch"] == 3


def test_resume_finds_the_photos_at_their_new_place(tmp_path, capsys, photo_folder):
    """Defect: after the photos moved, --resume RUN --data NEWPLACE said "ignored: --data" and then
    failed on the old folder. The new place is taken when it holds the same photos (their count,
    names and sizes), and said so; other photos are refused; a missing folder says what to do."""
    old, new, other = tmp_path / "old", tmp_path / "new", tmp_path / "other"
    shutil.copytree(photo_folder, old)
    run = tmp_path / "run"
    code, err = run_train_here(capsys, *tiny_train(old), "--out", run, "--epochs", 1)
    assert code == 0, err
    old.rename(new)
    code, err = run_train_here(capsys, "--resume", run, "--epochs", 2, "--quiet")
    assert code == 2 and err == [f"train.py: error: the photos of {run} are no longer in {old}: if they moved, "
                                 f"give their new place with --resume {run} --data FOLDER"]
    shutil.copytree(new, other)
    (other / "000.png").unlink()
    code, err = run_train_here(capsys, "--resume", run, "--data", other, "--epochs", 2, "--quiet")
    assert code == 2 and len(err) == 1 and "holds 11 image files that are not the 12" in err[0], err
    code, err = run_train_here(capsys, "--resume", run, "--data", new, "--epochs", 2, "--quiet")
    assert code == 0 and err == [f"train.py: warning: --resume reads the photos of {run} from their new place, "
                                 f"{new}: the same 12 image files (names and sizes) as were in {old}"]
    _, meta = load_npz(run / "checkpoint.npz")
    assert meta["epoch"] == 2 and meta["train_config"]["data"] == [str(new)]
    code, err = run_train_here(capsys, "--resume", run, "--epochs", 3, "--quiet")  # the new place is the run's now
    assert code == 0 and err == []


@pytest.mark.parametrize("photos, args", [(12, ["--val-fraction", "0"]), (1, ["--batch-size", "1"])],
                         ids=["val-fraction-0", "one-photo"])
def test_a_run_without_a_validation_set_says_so_once_and_reports_the_training_loss(tmp_path, capsys, photos, args):
    """Defect: every epoch printed "val loss nan val PSNR nan dB", log.csv held nan and curves.png
    an empty PSNR panel."""
    folder = make_photos(tmp_path / "photos", photos)
    run = tmp_path / "run"
    train_args = [a for a in tiny_train(folder) if a != "--quiet"]
    code = train_cli.main([str(a) for a in [*train_args, *args, "--out", run, "--epochs", 2]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    notes = [line for line in captured.err.splitlines() if "validation" in line]
    shown = "12 photos, --val-fraction 0" if photos == 12 else "1 photo, --val-fraction 0.1"
    assert notes == [f"train.py: warning: no validation set ({shown}): each epoch reports the training loss alone"]
    epochs = [line for line in captured.out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and all("train loss" in line and "val" not in line for line in epochs), epochs
    assert "nan" not in captured.out and "done: 2 epochs, train loss" in captured.out
    rows = (run / "log.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_loss,val_loss,val_psnr,seconds"
    assert [row.split(",")[2:4] for row in rows[1:]] == [["", ""], ["", ""]]
    assert Image.open(run / "curves.png").width < 900  # one panel, the training loss (two are 900 px wide)


def test_init_with_a_folder_says_what_every_command_says(tmp_path, capsys, photo_folder):
    """Defect: train.py --init DIR said "no such file" where colorize, evaluate and serve say
    "is a folder; weights are a .npz file"."""
    code, err = run_train_here(capsys, *tiny_train(photo_folder), "--init", tmp_path, "--out", tmp_path / "run")
    assert code == 2 and len(err) == 1
    _, _, colorize_err = run_colorize(capsys, tmp_path, "--weights", tmp_path)
    assert err[0].split("error: ", 1)[1] == colorize_err[0].split("error: ", 1)[1] == (
        f"{tmp_path}: is a folder; weights are a .npz file (a run's model.npz or checkpoint.npz)")


def test_chroma_gain_option_scales_the_colors_of_the_output(tmp_path, capsys):
    weights = tiny_weights(tmp_path / "w.npz")
    photo = save_image(tmp_path / "p.png", colorful_rgb(16, 16))
    chroma = {}
    for gain in (None, 1, 0, 2.5):
        out = tmp_path / f"out_{gain}"
        args = ["--weights", weights, "--output", out] + ([] if gain is None else ["--chroma-gain", gain])
        assert run_colorize(capsys, photo, *args)[0] == 0
        lab = rgb_to_lab(np.asarray(Image.open(out / "p.png"), np.float64) / 255)
        chroma[gain] = np.hypot(lab[..., 1], lab[..., 2]).mean()
    assert chroma[None] == chroma[1] and chroma[0] < 1.0 < chroma[1] < chroma[2.5]
