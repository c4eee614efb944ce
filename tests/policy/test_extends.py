"""Policies that build on policies: extends, its edits, its errors, its reloads."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from spoa.policy import PolicyError, Request, Resolve, load_policy, policy_version
from spoa.policy.loader import bundled_names
from spoa.policy.reload import PolicyHolder
from spoa.policy.schema import RuleSpec

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
version: 1
name: base
seed: 7
classes:
  main:
  sync:
  generic:
default: {class: generic}
rules:
  - {name: sync, class: sync, key: user, path: '^/sync$'}
  - {name: sso, class: main, path: '^/sso'}
  - {name: media, class: generic, path: '^/media/'}
whoami: {url: 'http://hs.example:8008/_matrix/client/v3/account/whoami'}
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy(str(path))
    return [str(e) for e in caught.value.errors]


def specs(path: Path) -> dict[str, RuleSpec]:
    """The rules of the policy at ``path`` as written, by name."""
    found = {}
    for rule in load_policy(str(path)).rules:
        assert rule.spec is not None
        found[rule.name] = rule.spec
    return found


def names(path: Path) -> list[str]:
    return [rule.name for rule in load_policy(str(path)).rules]


def test_an_extending_policy_inherits_everything_it_does_not_change(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    site = write(tmp_path, "site.yaml", "version: 1\nextends: ./base.yaml\n")
    policy = load_policy(str(site))
    base = load_policy(str(tmp_path / "base.yaml"))
    assert [r.name for r in policy.rules] == ["sync", "sso", "media"]
    assert policy.classes == base.classes
    assert policy.seed == 7 and policy.spec.name == "base"
    assert policy.default.worker_class == "generic"
    assert policy.whoami == base.whoami
    assert policy.spec.extends == "./base.yaml"
    request = Request("GET", "/sync", None, "Bearer syt_YWxpY2U_x_y")
    assert policy.decide(request).key == base.decide(request).key


def test_rules_are_added_before_and_after_replaced_in_place_and_dropped(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    site = write(
        tmp_path,
        "site.yaml",
        """\
        version: 1
        name: site
        extends: base.yaml
        seed: 9
        classes:
          mas: {description: auth}
        default: {class: main}
        rules:
          before:
            - {name: login, class: mas, path: '^/login'}
          after:
            - {name: rest, class: generic, path: '^/'}
          replace:
            - {name: media, class: main, key: uri, path: '^/media/v3/'}
          drop: [sso]
        whoami: {url: 'https://hs.example/_matrix/client/v3/account/whoami', resolve: all}
        """,
    )
    policy = load_policy(str(site))
    assert [r.name for r in policy.rules] == ["login", "sync", "media", "rest"]
    assert policy.classes == ("main", "sync", "generic", "mas")
    assert policy.seed == 9 and policy.spec.name == "site"
    assert policy.default.worker_class == "main"
    assert policy.whoami is not None and policy.whoami.resolve is Resolve.ALL
    assert policy.decide(Request("POST", "/login")).worker_class == "mas"
    assert policy.decide(Request("GET", "/sso/x")).rule == "rest"
    media = policy.decide(Request("GET", "/media/v3/x"))
    assert (media.worker_class, media.key_kind) == ("main", "uri")
    # Each rule knows the file it is written in.
    sources = {r.name: Path(r.spec.source).name for r in policy.rules if r.spec}
    assert sources == {"login": "site.yaml", "sync": "base.yaml", "media": "site.yaml",
                       "rest": "site.yaml"}  # fmt: skip


def test_a_dropped_rule_may_come_back_under_its_name_elsewhere(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    site = write(
        tmp_path,
        "site.yaml",
        """\
        version: 1
        extends: ./base.yaml
        rules:
          drop: [sso]
          before:
            - {name: sso, class: main, path: '^/sso'}
        """,
    )
    assert names(site) == ["sso", "sync", "media"]


def test_a_bundled_policy_is_extended_by_name(tmp_path: Path) -> None:
    site = write(
        tmp_path,
        "site.yaml",
        """\
        version: 1
        extends: synapse-workers
        rules:
          after:
            - {name: bridge, class: client_reader, path: '^/_matrix/app/'}
        """,
    )
    bundled = load_policy(str(ROOT / "policies" / "synapse-workers.yaml"))
    policy = load_policy(str(site))
    assert [r.name for r in policy.rules] == [*(r.name for r in bundled.rules), "bridge"]
    assert {"simple", "synapse-workers", "synapse-workers-mas"} <= set(bundled_names())


def test_chains_of_bases_are_followed(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    write(
        tmp_path,
        "middle.yaml",
        "version: 1\nextends: ./base.yaml\nrules: {drop: [media]}\n",
    )
    top = write(
        tmp_path,
        "top.yaml",
        "version: 1\nextends: ./middle.yaml\nrules: {after: [{name: m, class: main, path: x}]}\n",
    )
    assert names(top) == ["sync", "sso", "m"]


def test_the_version_follows_the_file_and_its_base(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", BASE)
    site = write(tmp_path, "site.yaml", "version: 1\nextends: ./base.yaml\n")
    plain = load_policy(str(base))
    assert plain.version == policy_version(base.read_bytes())
    first = load_policy(str(site)).version
    assert first not in (plain.version, policy_version(site.read_bytes()))
    base.write_text(BASE.replace("seed: 7", "seed: 8"))
    assert load_policy(str(site)).version != first


def test_an_edit_of_the_base_reloads_the_policy_built_on_it(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", BASE)
    site = write(tmp_path, "site.yaml", "version: 1\nextends: ./base.yaml\n")
    holder = PolicyHolder(str(site), settle=0)
    assert holder.reload().outcome == "unchanged"
    assert sorted(Path(f).name for f in holder.files) == ["base.yaml", "site.yaml"]
    base.write_text(BASE.replace("'^/media/'", "'^/_media/'"))
    assert holder.reload().outcome == "loaded"
    assert holder.current.decide(Request("GET", "/_media/x")).rule == "media"
    base.write_text(BASE.replace("class: sync, key: user", "class: nope"))
    result = holder.reload()
    assert result.outcome == "failed"
    assert any("base.yaml" in e and "unknown class 'nope'" in e for e in result.errors)
    assert holder.reload().outcome == "unchanged"  # a rejected content is tried once
    assert holder.current.decide(Request("GET", "/_media/x")).rule == "media"


def test_a_policy_and_its_base_edited_together_settle_together(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", BASE)
    site = write(tmp_path, "site.yaml", "version: 1\nextends: ./base.yaml\n")
    holder = PolicyHolder(str(site), settle=0.3)
    for path, text in (
        (base, BASE.replace("'^/media/'", "'^/_media/'")),
        (site, "version: 1\nextends: ./base.yaml\nseed: 9\n"),
    ):
        with path.open("r+") as handle:  # in place: both wait to settle
            handle.truncate(0)
            handle.write(text)
    assert holder.reload().outcome == "settling"
    time.sleep(0.35)
    assert holder.reload().outcome == "loaded"  # one settle for both, not one each
    assert holder.current.decide(Request("GET", "/_media/x")).rule == "media"
    assert holder.current.seed == 9


# -- errors, each with its file, line and YAML path ---------------------------------------


def test_an_unknown_bundled_base_names_the_bundled_ones(tmp_path: Path) -> None:
    site = write(tmp_path, "site.yaml", "version: 1\nextends: synapse-wrokers\n")
    (error,) = errors_of(site)
    assert error.startswith(f"{site}:2: extends: unknown bundled policy 'synapse-wrokers'")
    assert "simple, synapse-workers, synapse-workers-mas" in error


def test_a_missing_base_file_is_named(tmp_path: Path) -> None:
    site = write(tmp_path, "site.yaml", "version: 1\nextends: ./nowhere.yaml\n")
    assert errors_of(site) == [
        f"{site}:2: extends: no policy file {str(tmp_path / 'nowhere.yaml')!r}"
    ]


def test_cycles_are_errors_whatever_their_length(tmp_path: Path) -> None:
    itself = write(tmp_path, "self.yaml", "version: 1\nextends: ./self.yaml\n")
    (error,) = errors_of(itself)
    assert "extends in a cycle" in error and error.startswith(f"{itself}:2: extends:")
    a = write(tmp_path, "a.yaml", "version: 1\nextends: ./b.yaml\n")
    write(tmp_path, "b.yaml", "version: 1\nextends: ./c.yaml\n")
    write(tmp_path, "c.yaml", "version: 1\nextends: ./a.yaml\n")
    errors = errors_of(a)
    assert errors[0].startswith(f"{a}:2: extends: the base policy './b.yaml' has 2 errors")
    assert any("extends in a cycle" in e and "a.yaml -> " in e for e in errors)


def test_errors_inside_the_base_are_located_in_the_base(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", BASE.replace("'^/media/'", "'('"))
    site = write(tmp_path, "site.yaml", "version: 1\nextends: ./base.yaml\n")
    errors = errors_of(site)
    assert errors[0] == f"{site}:2: extends: the base policy './base.yaml' has 1 error"
    assert errors[1].startswith(f"{base}:12: rules[2].path: bad regex '('")


EDIT_ERRORS = {
    "replace an unknown rule": (
        "rules:\n  replace:\n    - {name: nope, class: main, path: x}\n",
        "site.yaml:5: rules.replace[0].name: no rule 'nope' to replace in",
    ),
    "drop an unknown rule": (
        "rules:\n  drop: [sync, nope]\n",
        "site.yaml:4: rules.drop[1]: no rule 'nope' to drop in",
    ),
    "drop twice": (
        "rules:\n  drop: [sso, sso]\n",
        "site.yaml:4: rules.drop[1]: rule 'sso' is dropped twice",
    ),
    "replace and drop": (
        "rules:\n  drop: [sso]\n  replace:\n    - {name: sso, class: main, path: x}\n",
        "site.yaml:6: rules.replace[0].name: rule 'sso' is both replaced and dropped",
    ),
    "add a rule under a base rule's name": (
        "rules:\n  after:\n    - {name: sync, class: main, path: x}\n",
        "site.yaml:5: rules.after[0].name: rule name 'sync' is already used in",
    ),
    "a list of rules": (
        "rules:\n  - {name: x, class: main, path: x}\n",
        "site.yaml:4: rules: a policy that extends another changes its rules with a mapping",
    ),
    "an unknown edit": (
        "rules:\n  prepend: []\n",
        "site.yaml:4: rules.prepend: unknown key 'prepend' "
        "(allowed: after, before, drop, patch, replace)",
    ),
    "patch an unknown rule": (
        "rules:\n  patch:\n    - {name: nope, class: main}\n",
        "site.yaml:5: rules.patch[0].name: no rule 'nope' to patch in",
    ),
    "patch a dropped rule": (
        "rules:\n  drop: [sso]\n  patch:\n    - {name: sso, class: main}\n",
        "site.yaml:6: rules.patch[0].name: rule 'sso' is both patched and dropped",
    ),
    "patch a replaced rule": (
        "rules:\n  replace:\n    - {name: sso, class: main, path: x}\n"
        "  patch:\n    - {name: sso, class: sync}\n",
        "site.yaml:7: rules.patch[0].name: rule 'sso' is both replaced and patched",
    ),
    "patch twice": (
        "rules:\n  patch:\n    - {name: sso, class: sync}\n    - {name: sso, key: user}\n",
        "site.yaml:6: rules.patch[1].name: rule 'sso' is patched twice",
    ),
    "a patch of nothing": (
        "rules:\n  patch:\n    - {name: sso}\n",
        "site.yaml:5: rules.patch[0]: a patch changes something: give one of add_path, class,",
    ),
    "a patch of a field rules do not have": (
        "rules:\n  patch:\n    - {name: sso, weight: 3}\n",
        "site.yaml:5: rules.patch[0].weight: unknown key 'weight'",
    ),
    "a patch to an unknown class": (
        "rules:\n  patch:\n    - {name: sso, class: nope}\n",
        "site.yaml:5: rules.patch[0].class: unknown class 'nope'",
    ),
    "a patch with a bad regex": (
        "rules:\n  patch:\n    - {name: sso, add_path: '^/sso('}\n",
        "site.yaml:5: rules.patch[0].add_path: ",
    ),
    "a patch that both sets and adds paths": (
        "rules:\n  patch:\n    - {name: sso, path: '^/a', add_path: '^/b'}\n",
        "site.yaml:5: rules.patch[0].add_path: give path (instead) or add_path",
    ),
    "a patch without a name": (
        "rules:\n  patch:\n    - {class: main}\n",
        "site.yaml:5: rules.patch[0]: missing required key 'name'",
    ),
    "patches not in a list": (
        "rules:\n  patch: {name: sso, class: main}\n",
        "site.yaml:4: rules.patch: expected a list of patches",
    ),
    "a class declared again": (
        "classes:\n  sync:\n",
        "site.yaml:4: classes.sync: class 'sync' is already declared in",
    ),
    "a rule naming an unknown class": (
        "rules:\n  before:\n    - {name: x, class: nope, path: x}\n",
        "site.yaml:5: rules.before[0].class: unknown class 'nope' (declared: main, sync, generic)",
    ),
    "a duplicate among the new rules": (
        "rules:\n  before:\n    - {name: x, class: main, path: x}\n"
        "  after:\n    - {name: x, class: main, path: y}\n",
        "site.yaml:7: rules.after[0].name: duplicate rule name 'x' (first at line 5)",
    ),
}


@pytest.mark.parametrize(("text", "expected"), EDIT_ERRORS.values(), ids=EDIT_ERRORS.keys())
def test_each_bad_edit_is_located_in_the_extending_file(
    tmp_path: Path, text: str, expected: str
) -> None:
    write(tmp_path, "base.yaml", BASE)
    site = tmp_path / "site.yaml"
    site.write_text("version: 1\nextends: ./base.yaml\n" + text)
    errors = errors_of(site)
    assert any(e.removeprefix(f"{tmp_path}/").startswith(expected) for e in errors), errors


def test_a_policy_without_extends_still_needs_every_section(tmp_path: Path) -> None:
    lonely = write(tmp_path, "lonely.yaml", "version: 1\n")
    assert errors_of(lonely) == [
        f"{lonely}:1: $: missing required key 'classes'",
        f"{lonely}:1: $: missing required key 'default'",
        f"{lonely}:1: $: missing required key 'rules'",
    ]


def test_a_patch_changes_the_fields_it_names_and_keeps_the_rest(tmp_path: Path) -> None:
    base = BASE.replace(
        "  - {name: media, class: generic, path: '^/media/'}",
        "  - {name: media, class: generic, path: '^/media/', methods: [GET],"
        " query: {absent: [x]}, description: media reads}",
    )
    write(tmp_path, "base.yaml", base)
    site = write(
        tmp_path,
        "site.yaml",
        """\
        version: 1
        extends: ./base.yaml
        rules:
          patch:
            - {name: sso, class: sync, key: user}
            - name: media
              add_path: '^/thumbs/'
              methods: null
              query: {present: [y]}
        """,
    )
    policy = load_policy(str(site))
    rules = specs(site)
    assert [r.name for r in policy.rules] == ["sync", "sso", "media"]
    sso = rules["sso"]
    assert (sso.worker_class, sso.key.value, sso.paths) == ("sync", "user", ("^/sso",))
    assert sso.source == str(tmp_path / "base.yaml")
    assert sso.patches == (f"{site}:5",)
    media = rules["media"]
    assert media.paths == ("^/media/", "^/thumbs/")
    assert media.methods is None
    assert (media.query_present, media.query_absent) == (("y",), ())
    assert media.description == "media reads"
    assert media.patches == (f"{site}:6",)
    assert rules["sync"].patches == ()
    # Routing follows: sso now keyed on the sync class, media's new path and condition.
    assert policy.decide(Request("GET", "/sso/x", None, None)).worker_class == "sync"
    assert policy.decide(Request("POST", "/thumbs/a", "y=1", None)).rule == "media"
    assert policy.decide(Request("GET", "/media/a", "x=1", None)).rule == "default"


def test_a_patch_follows_the_base_it_patches(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    site = write(
        tmp_path,
        "site.yaml",
        "version: 1\nextends: ./base.yaml\nrules:\n  patch:\n    - {name: media, class: main}\n",
    )
    assert load_policy(str(site)).decide(Request("GET", "/media/a", None, None)).rule == "media"
    # The base gains a path for media: the patched rule has it too.
    write(tmp_path, "base.yaml", BASE.replace("path: '^/media/'", "path: ['^/media/', '^/m2/']"))
    moved = load_policy(str(site)).decide(Request("GET", "/m2/a", None, None))
    assert (moved.rule, moved.worker_class) == ("media", "main")


def test_patches_of_patches_are_all_recorded(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    write(
        tmp_path,
        "mid.yaml",
        "version: 1\nextends: ./base.yaml\nrules:\n  patch:\n    - {name: sso, class: sync}\n",
    )
    site = write(
        tmp_path,
        "site.yaml",
        "version: 1\nextends: ./mid.yaml\nrules:\n  patch:\n    - {name: sso, key: user}\n",
    )
    sso = specs(site)["sso"]
    assert (sso.worker_class, sso.key.value) == ("sync", "user")
    assert sso.patches == (f"{tmp_path / 'mid.yaml'}:5", f"{site}:5")


def test_moving_typing_to_main_takes_two_lines(tmp_path: Path) -> None:
    site = write(
        tmp_path,
        "site.yaml",
        """\
        version: 1
        extends: synapse-workers
        rules:
          patch: [{name: typing, class: main}]
        """,
    )
    policy = load_policy(str(site))
    base = load_policy(str(ROOT / "policies" / "synapse-workers.yaml"))
    typing = "/_matrix/client/v3/rooms/!r:hs/typing/@u:hs"
    assert base.decide(Request("PUT", typing, None, None)).worker_class != "main"
    assert policy.decide(Request("PUT", typing, None, None)).worker_class == "main"
    assert policy.decide(Request("PUT", typing, None, None)).rule == "typing"
    # Nothing else moved.
    for method, path in [
        ("GET", "/_matrix/client/v3/sync"),
        ("PUT", "/_matrix/client/v3/rooms/!r:hs/send/m.room.message/1"),
    ]:
        assert (
            policy.decide(Request(method, path, None, None)).worker_class
            == base.decide(Request(method, path, None, None)).worker_class
        )


def test_the_docs_example_of_extends_is_a_valid_policy(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "policy.md").read_text()
    start = text.index("extends: synapse-workers       #")
    example = "version: 1\n" + text[start : text.index("```", start)]
    site = write(tmp_path, "site.yaml", example)
    rules = specs(site)
    assert rules["typing"].worker_class == "main" and rules["typing"].patches
    assert rules["profile"].paths[-1] == "^/_matrix/client/v1/profile/"
    assert "sso" not in rules and next(iter(rules)) == "bridge_sync"
