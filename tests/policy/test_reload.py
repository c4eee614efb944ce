"""Hot reload: every way a policy file changes, and broken edits that change nothing."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest

from spoa.policy import PolicyError, Request, compile_policy
from spoa.policy.reload import PolicyHolder, ReloadResult

ROOT = Path(__file__).resolve().parents[2]

TEMPLATE = """\
version: 1
classes: {{main: , a: , b: }}
default: {{class: main}}
rules:
  - name: r
    class: {target}
    path: '^/x'
"""


def policy_text(target: str) -> str:
    return TEMPLATE.format(target=target)


def routed(holder: PolicyHolder) -> str:
    return holder.current.decide(Request("GET", "/x")).worker_class


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text("a"))
    return path


def test_initial_load_failure_raises_with_located_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nclasses: {main: }\ndefault: {class: x}\nrules: []\n")
    with pytest.raises(PolicyError) as info:
        PolicyHolder(str(path))
    assert str(info.value.errors[0]) == (
        f"{path}:3: default.class: unknown class 'x' (declared: main)"
    )


def test_missing_file_at_start_is_a_located_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        PolicyHolder(str(tmp_path / "absent.yaml"))
    assert "cannot read: No such file or directory" in str(info.value)


def test_unchanged_file_is_not_reloaded(policy_file: Path) -> None:
    holder = PolicyHolder(str(policy_file), settle=0)
    version = holder.current.version
    assert holder.reload() == ReloadResult("unchanged", version)
    assert holder.reloads_ok == 0


def test_edit_in_place_is_picked_up_once_it_has_settled(policy_file: Path) -> None:
    holder = PolicyHolder(str(policy_file), settle=0.3)
    old = holder.current
    with policy_file.open("r+") as handle:  # same inode, rewritten
        handle.truncate(0)
        handle.write(policy_text("b"))
    assert holder.reload().outcome == "settling"
    time.sleep(0.35)
    result = holder.reload()
    assert result.outcome == "loaded" and result.version != old.version
    assert routed(holder) == "b"
    assert holder.reloads_ok == 1 and holder.last_reload_ok
    # The old policy object is untouched: requests it was deciding finish on it.
    assert old.decide(Request("GET", "/x")).worker_class == "a"


def test_a_truncation_that_leaves_the_mtime_old_still_settles(policy_file: Path) -> None:
    """Caught between truncate and write, with the file's mtime not yet moved."""
    holder = PolicyHolder(str(policy_file), settle=0.3)
    old = holder.current.version
    past = time.time() - 60

    def rewrite(text: str) -> None:
        with policy_file.open("r+") as handle:
            handle.truncate(0)
            handle.write(text)
        os.utime(policy_file, (past, past))

    rewrite("")
    assert holder.reload().outcome == "settling"
    rewrite(policy_text("b"))
    assert holder.reload().outcome == "settling"  # new bytes: they settle anew
    assert holder.reloads_failed == 0
    time.sleep(0.35)
    result = holder.reload()
    assert result.outcome == "loaded" and result.version != old
    assert routed(holder) == "b"
    assert holder.reloads_failed == 0


def test_an_empty_file_that_stays_empty_is_reported_once_settled(policy_file: Path) -> None:
    holder = PolicyHolder(str(policy_file), settle=0.2)
    policy_file.write_text("")
    assert holder.reload().outcome == "settling"
    time.sleep(0.25)
    result = holder.reload()
    assert result.outcome == "failed" and "empty" in result.errors[0]
    assert holder.reload().outcome == "unchanged"  # reported once


def test_atomic_rename_is_picked_up_at_once(policy_file: Path) -> None:
    holder = PolicyHolder(str(policy_file), settle=30)
    staged = policy_file.with_name("staged.yaml")
    staged.write_text(policy_text("b"))
    os.replace(staged, policy_file)
    assert holder.reload().outcome == "loaded"
    assert routed(holder) == "b"


def test_kubernetes_configmap_symlink_swap_is_picked_up(tmp_path: Path) -> None:
    # A ConfigMap volume: policy.yaml -> ..data/policy.yaml, ..data -> ..<timestamp>
    first = tmp_path / "..2026_11_24_10_00_00.1"
    first.mkdir()
    (first / "policy.yaml").write_text(policy_text("a"))
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "policy.yaml").symlink_to("..data/policy.yaml")
    holder = PolicyHolder(str(tmp_path / "policy.yaml"))  # a swap is complete: no settling
    assert routed(holder) == "a"

    second = tmp_path / "..2026_11_24_10_05_00.2"
    second.mkdir()
    (second / "policy.yaml").write_text(policy_text("b"))
    (tmp_path / "..data_tmp").symlink_to(second.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert holder.reload().outcome == "loaded"
    assert routed(holder) == "b"


def test_broken_edit_keeps_the_running_policy_and_reports_where(policy_file: Path) -> None:
    changes: list[ReloadResult] = []
    holder = PolicyHolder(str(policy_file), on_change=lambda h, r: changes.append(r), settle=0)
    version = holder.current.version
    policy_file.write_text(policy_text("nope"))
    result = holder.reload()
    assert result.outcome == "failed"
    assert result.version == version == holder.current.version
    assert result.errors == (
        f"{policy_file}:6: rules[0].class: unknown class 'nope' (declared: main, a, b)",
    )
    assert routed(holder) == "a"
    assert holder.reloads_failed == 1 and not holder.last_reload_ok
    assert holder.last_error == result.errors[0]
    assert changes == [result]
    # The same broken content is not reported again on every poll...
    assert holder.reload().outcome == "unchanged"
    assert holder.reloads_failed == 1
    # ...but SIGHUP tries again and says so.
    assert holder.reload(force=True).outcome == "failed"
    assert holder.reloads_failed == 2


def test_fix_after_a_broken_edit_is_picked_up(policy_file: Path) -> None:
    holder = PolicyHolder(str(policy_file), settle=0)
    policy_file.write_text("version: 1\nclasses: [\n")
    assert holder.reload().outcome == "failed"
    policy_file.write_text(policy_text("b"))
    assert holder.reload().outcome == "loaded"
    assert routed(holder) == "b"
    assert holder.last_reload_ok and holder.last_error is None


def test_reverting_a_broken_edit_to_the_running_content_clears_nothing_but_is_quiet(
    policy_file: Path,
) -> None:
    holder = PolicyHolder(str(policy_file), settle=0)
    original = policy_file.read_text()
    policy_file.write_text("not: [valid")
    assert holder.reload().outcome == "failed"
    policy_file.write_text(original)
    assert holder.reload().outcome == "unchanged"
    assert routed(holder) == "a"


def test_a_file_that_disappears_keeps_the_policy_and_is_reported_once(policy_file: Path) -> None:
    holder = PolicyHolder(str(policy_file), settle=0)
    policy_file.unlink()
    assert holder.reload().outcome == "failed"
    assert holder.reload().outcome == "unchanged"
    assert holder.reloads_failed == 1
    policy_file.write_text(policy_text("b"))
    assert holder.reload().outcome == "loaded"


def test_the_watcher_polls_and_swaps(policy_file: Path) -> None:
    holder = PolicyHolder(str(policy_file), settle=0)

    async def scenario() -> None:
        task = asyncio.create_task(holder.watch(0.05))
        try:
            policy_file.write_text(policy_text("b"))
            for _ in range(100):
                if routed(holder) == "b":
                    break
                await asyncio.sleep(0.02)
            assert routed(holder) == "b"
        finally:
            task.cancel()

    asyncio.run(scenario())


def test_a_policy_written_in_place_in_chunks_is_loaded_once_whole(tmp_path: Path) -> None:
    text = (ROOT / "policies" / "synapse-workers.yaml").read_text()
    # Cut at rule boundaries: each prefix is itself a valid policy (fewer rules).
    starts = [m.start() for m in re.finditer(r"^  - name: ", text, re.M)]
    cuts = [starts[len(starts) // 3], starts[2 * len(starts) // 3]]
    chunks = [text[: cuts[0]], text[cuts[0] : cuts[1]], text[cuts[1] :]]
    for end in cuts:
        compile_policy(text[:end].encode())  # the prefixes alone would load
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text("a"))
    loaded: list[int] = []
    holder = PolicyHolder(
        str(path), on_change=lambda h, r: loaded.append(len(h.current.rules)), settle=1.0
    )

    async def scenario() -> None:
        watcher = asyncio.get_running_loop().create_task(holder.watch(0.05))
        with path.open("r+") as handle:  # in place: same inode all along
            handle.truncate(0)
            for chunk in chunks:
                handle.write(chunk)
                handle.flush()
                await asyncio.sleep(0.3)
        await asyncio.sleep(1.5)
        watcher.cancel()

    asyncio.run(scenario())
    assert loaded == [len(compile_policy(text.encode()).rules)]
    assert holder.reloads_failed == 0
