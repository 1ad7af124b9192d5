"""`--help` of the Hydra commands: each lists the groups and keys it accepts, and no others."""
import subprocess
import sys

MQAR_ONLY = ["sweep", "launcher", "zoology_L64", "based_fig2"]  # groups and options of train and sweep only


def help_of(command, tmp_path):
    out = subprocess.run([sys.executable, "-m", "mom_bench", command, "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def model_line(text):
    return next(line for line in text.splitlines() if line.startswith("model: "))


def test_pretrain_help_lists_the_model_group_and_its_own_keys_only(tmp_path):
    text = help_of("pretrain", tmp_path)
    assert text.startswith("mom_bench pretrain: ")
    assert all(key in text for key in ("out_dir: outputs/pretrain", "save_every:", "files: null", "max_steps:"))
    assert not any(word in text for word in MQAR_ONLY), text
    # the hand-written option list of the model group is the one Hydra finds in conf/model/
    assert model_line(text) == model_line(help_of("train", tmp_path))


def test_eval_help_lists_its_keys_and_no_group(tmp_path):
    text = help_of("eval", tmp_path)
    assert text.startswith("mom_bench eval: ")
    assert all(key in text for key in ("checkpoint: ???", "tasks:", "limit: null", "results_dir:"))
    assert not any(word in text for word in MQAR_ONLY + ["model: "]), text


def test_train_help_still_lists_every_group(tmp_path):
    text = help_of("train", tmp_path)
    assert all(f"\n{group}: " in text for group in ("data", "launcher", "model", "optim", "sweep"))
    assert all(word in text for word in MQAR_ONLY)
