"""The console script: help without heavy imports, one-line errors, resolved configs."""

import subprocess
import sys

from cobra_scale.cli import main


def test_help_does_not_import_ray_torch_or_deepspeed():
    code = (
        "import sys\n"
        "from cobra_scale.cli import main\n"
        "try:\n    main(['data', 'synth', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('ray', 'deepspeed', 'torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "data" in capsys.readouterr().out


def test_user_error_is_one_line_exit_2(capsys, tmp_path):
    rc = main(["data", "split", "--sequences", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_print_config(capsys):
    assert main(["data", "split", "--sequences", "s", "--out", "o", "--print-config", "kind=time"]) == 0
    out = capsys.readouterr().out
    assert "kind: time" in out and "max_history: 20" in out


def test_overrides_may_sit_between_flags(capsys):
    assert main(["ids", "--items", "i.parquet", "quantizer.codes=4", "--out", "o", "behaviour.dim=8", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "codes: 4" in out and "dim: 8" in out
    try:
        main(["ids", "--items", "i.parquet", "--out", "o", "--no-such-flag"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_list_field_given_as_flag_names_the_override(capsys):
    try:
        main(["recommend", "--run", "r", "--history=[1,2]"])
        raise AssertionError("expected a usage error")
    except SystemExit as exc:
        assert exc.code == 2
    err = capsys.readouterr().err
    assert "history=[...]" in err and "Traceback" not in err


def test_recommend_rejects_bad_input_before_loading(capsys, tmp_path):
    # each is a config error: one line, exit 2, before the (missing) run is opened
    for args, words in (
        (["history=[1,foo]"], "integer item ids"),
        (["history=[1,2.5]"], "integer item ids"),  # never cast 2.5 to 2 silently
        (["--k", "0"], "k must be >= 1"),
        (["--users", "-1"], "users must be >= 1"),  # -1 would slice off the last user only
    ):
        assert main(["recommend", "--run", str(tmp_path / "missing"), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err, (args, err)
    assert main(["recommend", "--run", "r", "history=[3,'7']", "--print-config"]) == 0
    assert "- 7" in capsys.readouterr().out
