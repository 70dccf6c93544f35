"""The last good policy copy: written when a policy loads cleanly, run when the file on disk is broken."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from xskbroker.broker import lastgood
from xskbroker.broker.lastgood import FILENAME, CopyError, PolicyKeeper
from xskbroker.policy import PolicyError, load_policy
from xskbroker.policy.loader import load_documents

GOOD = 'version = 1\n[[allow]]\nname = "a"\nusers = [1000]\ninterfaces = ["xsk*"]\n'
OTHER = 'version = 1\n[[allow]]\nname = "b"\nusers = [2000]\ninterfaces = ["eth*"]\n'
DROPIN = 'version = 1\n[[deny]]\nname = "d"\nusers = [1000]\ninterfaces = ["xsk9"]\n'


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path]:
    etc, state = tmp_path / "etc", tmp_path / "state"
    etc.mkdir(mode=0o755)
    state.mkdir(mode=0o700)
    (etc / "policy.toml").write_text(GOOD)
    (etc / "policy.toml").chmod(0o644)
    return etc / "policy.toml", state


def test_a_clean_load_saves_a_private_copy_that_loads_back_the_same_policy(site: tuple[Path, Path]) -> None:
    policy_file, state = site
    (policy_file.parent / "policy.d").mkdir(mode=0o755)
    (policy_file.parent / "policy.d" / "10-deny.toml").write_text(DROPIN)
    keeper = PolicyKeeper(str(policy_file), str(state))
    policy = keeper.start()
    copy = state / FILENAME
    assert copy.stat().st_mode & 0o777 == 0o600 and not keeper.fallback
    assert [d["path"] for d in json.loads(copy.read_text())["documents"]] == list(policy.sources)
    loaded = lastgood.load(str(state))
    assert loaded is not None and loaded.policy == policy and len(policy.rules) == 2
    assert not list(state.glob("*.tmp"))


def test_a_broken_file_starts_on_the_copy_and_says_why(site: tuple[Path, Path]) -> None:
    policy_file, state = site
    good = PolicyKeeper(str(policy_file), str(state)).start()
    policy_file.write_text(GOOD + "[[allow]\n")  # a syntax error
    keeper = PolicyKeeper(str(policy_file), str(state))
    assert keeper.start() == good and keeper.fallback
    assert keeper.errors and "policy.toml" in keeper.errors[0]
    described = keeper.describe(admin=True)
    assert described["fallback"] is True and described["source"] == str(policy_file)
    assert described["errors"] == keeper.errors and described["copy"] == str(state / FILENAME)
    assert keeper.describe(admin=False)["errors"] == len(keeper.errors)  # the file's text is not every user's
    note = keeper.status_note()
    assert note is not None and note.startswith("POLICY FALLBACK") and str(policy_file) in note


def test_an_unsafe_file_starts_on_the_copy(site: tuple[Path, Path]) -> None:
    policy_file, state = site
    PolicyKeeper(str(policy_file), str(state)).start()
    policy_file.chmod(0o666)  # world-writable: anyone could grant themselves anything
    keeper = PolicyKeeper(str(policy_file), str(state))
    keeper.start()
    assert keeper.fallback and any("writable" in e for e in keeper.errors), keeper.errors


def test_without_a_copy_a_broken_file_still_refuses_to_start(site: tuple[Path, Path]) -> None:
    policy_file, state = site
    policy_file.write_text("version = 1\n[[allow]]\nname = 3\n")
    with pytest.raises(PolicyError) as e:
        PolicyKeeper(str(policy_file), str(state)).start()
    assert "nothing safe to run" in e.value.errors[-1]
    assert not (state / FILENAME).exists()


def test_a_copy_that_is_not_ours_or_is_a_link_counts_as_none(site: tuple[Path, Path], tmp_path: Path) -> None:
    policy_file, state = site
    PolicyKeeper(str(policy_file), str(state)).start()
    elsewhere = tmp_path / "planted.json"
    os.replace(state / FILENAME, elsewhere)
    (state / FILENAME).symlink_to(elsewhere)
    assert lastgood.load(str(state)) is None
    (state / FILENAME).unlink()
    os.link(elsewhere, state / FILENAME)  # a hard link: the inode is shared with a file outside
    assert lastgood.load(str(state)) is None


def test_a_damaged_copy_is_named_and_not_run(site: tuple[Path, Path]) -> None:
    policy_file, state = site
    (state / FILENAME).write_text('{"format": 1, "saved_at": 0, "documents": [{"path": "p", "text": "[[x"}]}')
    with pytest.raises(CopyError, match="not a valid policy"):
        lastgood.load(str(state))
    policy_file.write_text("nonsense")
    with pytest.raises(PolicyError) as e:
        PolicyKeeper(str(policy_file), str(state)).start()
    assert "cannot stand in" in e.value.errors[-1]
    (state / FILENAME).write_text("not json")
    with pytest.raises(CopyError, match="unreadable"):
        lastgood.load(str(state))


def test_the_copy_is_what_was_loaded_never_a_later_edit(site: tuple[Path, Path]) -> None:
    policy_file, state = site
    policy, documents = load_documents(policy_file)
    policy_file.write_text(OTHER)  # edited between the load and the save
    assert lastgood.save(str(state), documents) == str(state / FILENAME)
    loaded = lastgood.load(str(state))
    assert loaded is not None and loaded.policy == policy
    assert [d["text"] for d in json.loads((state / FILENAME).read_text())["documents"]] == [GOOD]


def test_saving_never_follows_a_planted_link(site: tuple[Path, Path], tmp_path: Path) -> None:
    policy_file, state = site
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (state / (FILENAME + ".tmp")).symlink_to(victim)
    PolicyKeeper(str(policy_file), str(state)).start()
    assert victim.read_text() == "precious" and (state / FILENAME).is_file()


def test_an_unchanged_policy_keeps_its_copy_and_its_date(site: tuple[Path, Path]) -> None:
    policy_file, state = site
    _, documents = load_documents(policy_file)
    lastgood.save(str(state), documents, now=1000.0)
    lastgood.save(str(state), documents, now=2000.0)
    loaded = lastgood.load(str(state))
    assert loaded is not None and loaded.saved_at == 1000.0


def test_reload_keeps_the_running_policy_on_errors_and_a_good_one_ends_the_fallback(site: tuple[Path, Path]) -> None:
    policy_file, state = site
    PolicyKeeper(str(policy_file), str(state)).start()
    policy_file.write_text("broken = [")
    keeper = PolicyKeeper(str(policy_file), str(state))
    keeper.start()
    assert keeper.fallback
    with pytest.raises(PolicyError):
        keeper.reload(str(policy_file))
    assert keeper.fallback and keeper.reload_errors and keeper.describe()["reload_errors"]
    policy_file.write_text(OTHER)
    new = keeper.reload(str(policy_file))
    assert not keeper.fallback and keeper.status_note() is None and keeper.describe() == {
        "source": str(policy_file), "fallback": False}
    loaded = lastgood.load(str(state))
    assert loaded is not None and loaded.policy == new  # the new policy is the copy now


def test_a_state_dir_it_cannot_write_is_reported_and_the_policy_still_runs(site: tuple[Path, Path]) -> None:
    policy_file, state = site
    records: list[dict[str, object]] = []
    keeper = PolicyKeeper(str(policy_file), str(state / "missing"), records.append)
    assert keeper.start().rules
    assert records[0]["event"] == "policy-lastgood-unsaved" and keeper.describe()["copy_error"]


# --- the parsed documents the copy keeps (a start spared tomllib) -------------------------------------------

START = """
import json, sys
sys.path[:0] = %r
from xskbroker.broker.lastgood import PolicyKeeper
policy = PolicyKeeper(%r, %r).start()
print(json.dumps({"tomllib": "tomllib" in sys.modules, "rules": [r.name for r in policy.rules]}))
"""


def _start_elsewhere(policy_file: Path, state: Path) -> dict[str, object]:
    """A start in a fresh interpreter: what it imported is its own."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", START % (sys.path, str(policy_file), str(state))],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_a_start_whose_files_match_the_copy_validates_its_documents_without_tomllib(
        site: tuple[Path, Path]) -> None:
    policy_file, state = site
    first = _start_elsewhere(policy_file, state)  # no copy yet: parsed, and the copy written with its document
    assert first == {"tomllib": True, "rules": ["a"]}
    kept = json.loads((state / FILENAME).read_text())
    assert kept["format"] == 2 and kept["documents"][0]["toml"]["allow"][0]["name"] == "a"
    assert _start_elsewhere(policy_file, state) == {"tomllib": False, "rules": ["a"]}
    policy_file.write_text(OTHER)  # a changed text is parsed afresh, whatever the copy keeps
    assert _start_elsewhere(policy_file, state) == {"tomllib": True, "rules": ["b"]}


def test_a_kept_document_that_does_not_validate_loses_to_the_file_and_is_mended(
        site: tuple[Path, Path]) -> None:
    policy_file, state = site
    PolicyKeeper(str(policy_file), str(state)).start()
    copy = json.loads((state / FILENAME).read_text())
    copy["documents"][0]["toml"]["allow"][0]["bogus"] = 1  # the same text, a document it never gave (and invalid)
    (state / FILENAME).write_text(json.dumps(copy))
    keeper = PolicyKeeper(str(policy_file), str(state))
    policy = keeper.start()
    assert [r.users for r in policy.rules] == [load_policy(policy_file).rules[0].users] and not keeper.fallback
    # and the copy is mended: the next start validates the file's own document from it
    [(_, _, doc)] = load_documents(policy_file)[1]
    assert lastgood.known_documents(str(state)) == {(str(policy_file), GOOD): doc}
    assert json.loads((state / FILENAME).read_text())["saved_at"] == copy["saved_at"]  # still first seen good then


def test_a_kept_document_no_toml_could_give_is_not_used(site: tuple[Path, Path]) -> None:
    policy_file, state = site
    PolicyKeeper(str(policy_file), str(state)).start()
    copy = json.loads((state / FILENAME).read_text())
    copy["documents"][0]["toml"]["allow"][0]["users"] = [None]  # JSON's null: no TOML file gives it
    (state / FILENAME).write_text(json.dumps(copy))
    assert lastgood.known_documents(str(state)) == {}
    assert PolicyKeeper(str(policy_file), str(state)).start() == load_policy(policy_file)


def test_the_example_policy_read_from_its_kept_document_is_the_policy_its_text_gives() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "policy.example.toml"
    text = example.read_text()
    _, [(_, _, doc)] = load_documents(example)
    again = json.loads(lastgood.encode([("p", text, doc)], 0.0))["documents"][0]["toml"]
    from xskbroker.policy.loader import parse_documents

    assert again == doc and parse_documents([("p", text)], {("p", text): again}) == parse_documents([("p", text)])


def test_a_document_json_cannot_hold_is_kept_as_text_alone() -> None:
    import datetime

    data = json.loads(lastgood.encode([("p", "t", {"when": datetime.date(2026, 1, 1)}), ("q", "u", {"n": 1.5})], 0.0))
    assert "toml" not in data["documents"][0] and data["documents"][1]["toml"] == {"n": 1.5}


def test_a_copy_of_the_first_format_is_read_and_upgraded_keeping_its_date(site: tuple[Path, Path]) -> None:
    policy_file, state = site
    (state / FILENAME).write_text(json.dumps({"format": 1, "saved_at": 1000.0, "documents": [
        {"path": str(policy_file), "text": GOOD}]}))
    (state / FILENAME).chmod(0o600)
    loaded = lastgood.load(str(state))
    assert loaded is not None and loaded.saved_at == 1000.0 and loaded.policy == load_policy(policy_file)
    PolicyKeeper(str(policy_file), str(state)).start()
    copy = json.loads((state / FILENAME).read_text())
    assert copy["format"] == 2 and copy["saved_at"] == 1000.0 and "toml" in copy["documents"][0]
