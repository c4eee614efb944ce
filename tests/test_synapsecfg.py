"""spoa check --synapse: the shipped deploy/synapse/ files, and broken copies of them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from spoa.cli import main
from spoa.findings import Level
from spoa.policy import load_policy
from spoa.synapsecfg import SynapseConfigError, check_synapse, load_synapse

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "synapse"
POLICY = str(ROOT / "policies" / "synapse-workers.yaml")


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    shutil.copytree(DEPLOY, tmp_path / "synapse")
    return tmp_path / "synapse"


def run_check(directory: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    workers = sorted(str(p) for p in (directory / "workers").glob("*.yaml"))
    code = main(
        ["check", POLICY, *extra, "--synapse", str(directory / "homeserver-workers.yaml"), *workers]
    )
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def test_the_shipped_synapse_files_fit_the_bundled_policy(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, output = run_check(copy, capsys)
    assert code == 0, output
    assert "ok: Synapse's 20 processes serve every class" in output
    assert "error" not in output


def test_every_class_of_the_bundled_policy_has_a_worker_file() -> None:
    workers = sorted(str(p) for p in (DEPLOY / "workers").glob("*.yaml"))
    deployment = load_synapse(str(DEPLOY / "homeserver-workers.yaml"), workers)
    classes = {p.worker_class for p in deployment.processes}
    assert set(load_policy(POLICY).classes) <= classes


def test_a_writer_moved_to_another_worker_is_named_with_its_line(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    homeserver = copy / "homeserver-workers.yaml"
    edit(homeserver, "  typing: [typing-1]", "  typing: [receipts-1]")
    code, output = run_check(copy, capsys)
    assert code == 1
    line = homeserver.read_text().splitlines().index("  typing: [receipts-1]") + 1
    assert f"{homeserver}:{line}: stream_writers.typing is ['receipts-1']" in output
    assert "sends typing requests (PUT /_matrix/client/v3/rooms/!r:x/typing/@u:x)" in output
    assert "which typing-1" in output and "not the typing writer" in output


def test_a_stream_main_writes_while_the_policy_sends_it_to_a_worker(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(copy / "homeserver-workers.yaml", "  presence: [presence-1]\n", "")
    code, output = run_check(copy, capsys)
    assert code == 1
    assert "main writes presence, but" in output and "class 'presence'" in output


def test_media_enabled_nowhere(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("media_repository-1", "quarantined_media_changes-1"):
        edit(copy / "workers" / f"{name}.yaml", "enable_media_repo: true\n", "")
    code, output = run_check(copy, capsys)
    assert code == 1
    assert "the media repository is on in no process" in output
    media = copy / "workers" / "media_repository-1.yaml"
    line = media.read_text().splitlines().index("worker_name: media_repository-1") + 1
    assert (
        f"{media}:{line}: {POLICY} sends GET /_matrix/client/v1/media/download/x/abc to class "
        "'media_repository', but media_repository-1 has the media repository off"
    ) in output


def test_a_class_with_no_worker(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (copy / "workers" / "user_dir-1.yaml").unlink()
    code, output = run_check(copy, capsys)
    assert code == 1
    assert "class 'user_dir' of" in output and "has no Synapse worker" in output


def test_each_problem_is_named_once(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (copy / "workers" / "user_dir-1.yaml").unlink()
    edit(copy / "homeserver-workers.yaml", "  typing: [typing-1]", "  typing: [receipts-1]")
    code, output = run_check(copy, capsys)
    errors = [line for line in output.splitlines() if line.startswith("error")]
    assert code == 1 and len(errors) == len(set(errors)) == 2, errors


def test_a_class_served_outside_synapse(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workers = sorted(str(p) for p in (copy / "workers").glob("*.yaml"))
    deployment = load_synapse(str(copy / "homeserver-workers.yaml"), workers)
    mas = ROOT / "policies" / "synapse-workers-mas.yaml"
    policy = load_policy(str(mas))
    without = check_synapse(policy, str(mas), deployment)
    assert any(f.level is Level.ERROR and "class 'mas'" in f.text for f in without)
    with_flag = check_synapse(policy, str(mas), deployment, ["mas"])
    assert all(f.level is not Level.ERROR for f in with_flag)


def test_a_writer_without_replication_listener_or_instance_map_entry(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(
        copy / "homeserver-workers.yaml",
        "  receipts-1: {host: synapse-receipts-1, port: 9093}\n",
        "",
    )
    edit(
        copy / "workers" / "receipts-1.yaml",
        "    resources: [{names: [replication]}]",
        "    resources: [{names: [metrics]}]",
    )
    code, output = run_check(copy, capsys)
    assert code == 1
    assert "receipts writer 'receipts-1' is not in instance_map" in output
    assert "receipts-1 writes receipts but has no replication listener" in output


def test_unreadable_and_broken_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SynapseConfigError, match="cannot read"):
        load_synapse(str(tmp_path / "absent.yaml"), [])
    broken = tmp_path / "hs.yaml"
    broken.write_text("listeners: [\n")
    with pytest.raises(SynapseConfigError, match="not YAML"):
        load_synapse(str(broken), [])
    broken.write_text("- a list\n")
    with pytest.raises(SynapseConfigError, match=r"hs.yaml:1: expected a mapping"):
        load_synapse(str(broken), [])
    broken.write_text("server_name: x\n")
    worker = tmp_path / "w.yaml"
    worker.write_text("worker_app: synapse.app.generic_worker\n")
    with pytest.raises(SynapseConfigError, match="no worker_name"):
        load_synapse(str(broken), [str(worker)])
    worker.write_text("worker_name: w-1\n")
    with pytest.raises(SynapseConfigError, match="worker 'w-1' again"):
        load_synapse(str(broken), [str(worker), str(worker)])


def test_the_check_exits_1_on_a_file_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["check", POLICY, "--synapse", str(tmp_path / "absent.yaml")])
    assert code == 1
    assert "error:" in capsys.readouterr().err


def test_media_on_main_as_deploy_synapse_media_on_main_makes_it(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (copy / "workers" / "media_repository-1.yaml").unlink()
    workers = sorted(str(p) for p in (copy / "workers").glob("*.yaml"))
    main_files = [str(copy / "homeserver-workers.yaml")]
    # Without main's media file: main has media off, and the media class no worker.
    code = main(["check", POLICY, "--main-serves-media", "--synapse", *main_files, *workers])
    out = capsys.readouterr()
    assert code == 1
    assert "homeserver-workers.yaml: class 'media_repository' has no worker" in out.err
    assert "enable_media_repo off" in out.err
    # The component's file, read after homeserver-workers.yaml, turns it on.
    main_files.append(str(copy / "media-on-main" / "media-on-main.yaml"))
    code = main(["check", POLICY, "--main-serves-media", "--synapse", *main_files, *workers])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "the main process serves its media (SYNAPSE_MAIN_SERVES_MEDIA)" in out.out
    # Without the flag, HAProxy would send media to a class with no worker.
    code = main(["check", POLICY, "--synapse", *main_files, *workers])
    assert code == 1
    assert "class 'media_repository' of" in capsys.readouterr().err


def test_main_reads_several_files_each_overriding_the_last(copy: Path) -> None:
    extra = copy / "more.yaml"
    extra.write_text("stream_writers:\n  typing: [main]\n")
    workers = sorted(str(p) for p in (copy / "workers").glob("*.yaml"))
    deployment = load_synapse([str(copy / "homeserver-workers.yaml"), str(extra)], workers)
    assert deployment.writers("typing") == (["main"], 2)
    findings = check_synapse(load_policy(POLICY), POLICY, deployment)
    # The error names the file the setting came from.
    assert any(f.level == Level.ERROR and f"{extra}:2" in f.text for f in findings)
