from leanml.errors import LeanmlError, check


def test_message_is_one_line():
    err = LeanmlError("bad value\n   'x'; accepted:\n a, b")
    assert "\n" not in str(err) and str(err) == "bad value 'x'; accepted: a, b"
    assert isinstance(err, ValueError)


def test_check_raises_only_when_false():
    check(True, "never")
    try:
        check(False, "threads 0")
    except LeanmlError as exc:
        assert str(exc) == "threads 0"
    else:
        raise AssertionError("check(False) did not raise")
