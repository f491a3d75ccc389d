"""Result files (bench results.json, tuning trial logs) name files without the machine's layout."""

from veridraft.profiles import recorded_path


def test_a_file_under_veridraft_home_is_recorded_relative_to_it(tmp_path, monkeypatch):
    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path / "home"))
    p = tmp_path / "home" / "models" / "smollm2-135m"
    p.mkdir(parents=True)
    assert recorded_path(str(p)) == "$VERIDRAFT_HOME/models/smollm2-135m"


def test_a_file_elsewhere_is_relative_to_the_working_directory_or_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("VERIDRAFT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert recorded_path(str(tmp_path / "data" / "q.jsonl")) == "data/q.jsonl"
    assert recorded_path("/somewhere/else/q.jsonl") == "q.jsonl"
    assert recorded_path("rel/q.jsonl") == "rel/q.jsonl"
