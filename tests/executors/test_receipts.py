"""Receipt rules: none, valid, malformed, wrong types, too large."""

from __future__ import annotations

import json

import pytest

from fleet_worker.receipts import MAX_RECEIPT_BYTES, ReceiptOutcome, parse_receipt

FULL = {
    "exit_code": 0,
    "summary": "Fixed the bug",
    "branch": "fleet/t1",
    "commit_sha": "0123456789ABCDEF0123456789abcdef01234567",
    "pr_url": "https://git.example.com/acme/rocket/pulls/7",
    "pr_number": 7,
    "tests": {"passed": 12, "failed": 0},
    "tokens": {"input": 1000, "output": 250},
    "cost_usd": 0.42,
    "agent_version": "codex 1.2",
    "log_tail": "all good",
}


def test_exit_zero_without_a_file_is_a_minimal_receipt() -> None:
    assert parse_receipt(None, 0) == ReceiptOutcome({"exit_code": 0})


def test_nonzero_exit_without_a_file_has_no_receipt_and_no_receipt_error() -> None:
    assert parse_receipt(None, 3) == ReceiptOutcome(None)


def test_a_valid_receipt_is_normalised() -> None:
    outcome = parse_receipt(json.dumps({**FULL, "unknown": 1, "pr_url": None}).encode(), 0)
    expected = {**FULL, "commit_sha": FULL["commit_sha"].lower(), "cost_usd": 0.42}
    del expected["pr_url"]
    assert outcome == ReceiptOutcome(expected)


def test_a_missing_exit_code_comes_from_the_process() -> None:
    assert parse_receipt(b'{"summary": "x"}', 2).receipt == {"exit_code": 2, "summary": "x"}


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"{not json", "receipt_invalid: not valid JSON"),
        (b"\xff\xfe", "receipt_invalid: receipt is not UTF-8"),
        (b"[1, 2]", "receipt_invalid: receipt must be a JSON object, got list"),
        (b'{"exit_code": "0"}', "receipt_invalid: exit_code must be an integer"),
        (b'{"exit_code": true}', "receipt_invalid: exit_code must be an integer"),
        (b'{"summary": 5}', "receipt_invalid: summary must be a string, got int"),
        (b'{"commit_sha": "main"}', "receipt_invalid: commit_sha must be a hexadecimal"),
        (b'{"pr_number": 0}', "receipt_invalid: pr_number must be a positive integer"),
        (b'{"tests": {"passed": 1}}', "receipt_invalid: tests.failed is missing"),
        (b'{"tests": [1, 2]}', "receipt_invalid: tests must be an object"),
        (b'{"tokens": {"input": -1, "output": 0}}', "receipt_invalid: tokens.input must be"),
        (b'{"tokens": {"input": 1.5, "output": 0}}', "receipt_invalid: tokens.input must be"),
        (b'{"cost_usd": "1"}', "receipt_invalid: cost_usd must be a number"),
        (b'{"cost_usd": NaN}', "receipt_invalid: cost_usd must be a number"),
        (b'{"cost_usd": -1}', "receipt_invalid: cost_usd must not be negative"),
    ],
)
def test_malformed_receipts_say_what_is_wrong(data: bytes, error: str) -> None:
    outcome = parse_receipt(data, 0)
    assert outcome.receipt is None
    assert outcome.error is not None and outcome.error.startswith(error), outcome.error


def test_receipt_size_is_capped() -> None:
    big = json.dumps({"exit_code": 0, "log_tail": "x" * MAX_RECEIPT_BYTES}).encode()
    outcome = parse_receipt(big, 0)
    assert outcome.error == f"receipt_invalid: receipt is larger than {MAX_RECEIPT_BYTES} bytes"


def test_a_receipt_of_a_failed_run_is_still_parsed() -> None:
    assert parse_receipt(b'{"exit_code": 1, "summary": "tests fail"}', 1).receipt == {
        "exit_code": 1,
        "summary": "tests fail",
    }
