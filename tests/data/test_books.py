import json

from veridraft.data.books import SHIPPED, books_path, read_lines


def test_the_shipped_copy_holds_the_four_novels_by_chapter():
    books = [json.loads(line) for line in read_lines(SHIPPED) if line.strip()]
    assert sorted(b["key"] for b in books) == [
        "emma",
        "mansfieldpark",
        "prideprejudice",
        "sensesensibility",
    ]
    assert all(len(b["chapters"]) >= 48 and b["chapters"][0]["text"] for b in books)


def test_the_shipped_copy_equals_the_shared_file_when_both_exist():
    path = books_path()
    if path == SHIPPED:  # no checkout of the shared data around: the copy is all there is
        assert read_lines(path)
        return
    assert read_lines(path) == read_lines(SHIPPED)
