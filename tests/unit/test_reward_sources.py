"""Reward sources (rlhf/reward_sources.py): parsing ppo.rewards, user functions, and the HTTP
scorer against a local server on 127.0.0.1 that the test starts (every request counted)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhf.config import ConfigError
from rlhf.reward_sources import (
    RewardSource,
    RewardSourceError,
    call_source,
    load_function,
    parse_reward_sources,
    per_row,
)


def test_empty_list_is_the_reward_model_alone():
    assert parse_reward_sources([]) == [RewardSource("rm", "reward", 1.0, "rm")]


def test_sources_parse_with_weights_names_and_http_options():
    got = parse_reward_sources([{"rm": "reward", "weight": 0.5}, {"fn": "pkg.mod:score"},
                                {"http": "https://x.example/score", "timeout": 2, "retries": 0, "name": "remote"}])
    assert got == [RewardSource("rm", "reward", 0.5, "rm"), RewardSource("fn", "pkg.mod:score", 1.0, "score"),
                   RewardSource("http", "https://x.example/score", 1.0, "remote", 2.0, 0)]


def test_several_rm_sources_are_members_of_one_source():
    entries = [{"rm": "reward", "weight": 0.5}, {"fn": "os.path:basename"}, {"rm": "my-rm:2", "weight": 0.5}]
    got = parse_reward_sources(entries)
    assert [s.target for s in got if s.kind == "rm"] == ["reward", "my-rm:2"]
    from rlhf.config import PPOConfig
    from rlhf.reward_sources import reward_sources

    cfg = PPOConfig(rewards=entries, advantage_estimator="grpo", num_generations=2)
    pairs = reward_sources(cfg, ensemble=True)
    assert [src for src, _ in pairs if src.kind == "rm"] == [RewardSource("rm", "reward", 0.5, "rm")]
    assert len(pairs) == 2
    # the default: one reward model alone adds no source; the stage's ensemble of several is one rm source
    assert reward_sources(PPOConfig()) == []
    assert [src for src, _ in reward_sources(PPOConfig(), ensemble=True)] == [RewardSource("rm", "reward", 1.0, "rm")]


@pytest.mark.parametrize("entries, message", [
    ([{"fn": "nocolon"}], r"ppo.rewards\[0\].fn: 'nocolon' must look like"),
    ([{"rm": "reward", "fn": "a:b"}], r"ppo.rewards\[0\]: needs exactly one of rm, fn, http"),
    ([{"http": "ftp://host"}], r"ppo.rewards\[0\].http: 'ftp://host' is not an http"),
    ([{"fn": "a:b"}, {"fn": "a:c", "weight": "x"}], r"ppo.rewards\[1\].weight: must be a number"),
    ([{"http": "http://h", "timeout": 0}], r"ppo.rewards\[0\].timeout must be > 0"),
    ([{"http": "http://h", "retries": 1.5}], r"ppo.rewards\[0\].retries: must be an integer"),
    ([{"fn": "a:b", "timeout": 3}], r"ppo.rewards\[0\]: unknown key\(s\) timeout for a fn source"),
    ([{"fn": "a:f"}, {"fn": "b:f"}], r"two sources are named 'f'"),
    ([{"rm": "reward"}, {"rm": "other", "weight": 2}], r"ppo.rewards\[1\]: the rm sources form one ensemble"),
    ([{"rm": "reward"}, {"rm": "other", "name": "b"}], r"ppo.rewards\[1\]: the rm sources form one ensemble"),
    ([{"rm": "reward", "name": "f"}, {"fn": "a:f"}], r"two sources are named 'f'"),
    (["a:b"], r"ppo.rewards\[0\]: must be a mapping"),
])
def test_bad_entries_name_the_entry_and_field(entries, message):
    with pytest.raises(ConfigError, match=message):
        parse_reward_sources(entries)


def test_function_from_a_file_relative_to_a_folder(tmp_path):
    (tmp_path / "rewards.py").write_text("def length(prompts, completions, metadata):\n"
                                         "    return [float(len(c)) for c in completions]\n")
    fn = load_function("rewards.py:length", "ppo.rewards[0].fn", tmp_path)
    src = RewardSource("fn", "rewards.py:length")
    assert call_source(src, fn, ["p", "q"], ["ab", "abcd"], [{}, {}]) == [2.0, 4.0]
    with pytest.raises(ConfigError, match=r"ppo.rewards\[0\].fn: .* has no function 'missing'"):
        load_function("rewards.py:missing", "ppo.rewards[0].fn", tmp_path)
    with pytest.raises(ConfigError, match="file not found"):
        load_function("nothere.py:f", "ppo.rewards[0].fn", tmp_path)


def test_function_answers_are_checked():
    src = RewardSource("fn", "m:f")
    with pytest.raises(RewardSourceError, match="reward source fn m:f: expected a list of 2 floats .* got 1 values"):
        call_source(src, lambda p, c, m: [1.0], ["a", "b"], ["x", "y"], [{}, {}])
    with pytest.raises(RewardSourceError, match="value 1 is nan"):
        call_source(src, lambda p, c, m: [1.0, float("nan")], ["a", "b"], ["x", "y"], [{}, {}])
    with pytest.raises(RewardSourceError, match="raised ZeroDivisionError"):
        call_source(src, lambda p, c, m: [1 / 0], ["a"], ["x"], [{}])


def test_a_tasks_evaluate_serves_per_row():
    fn = per_row(lambda prompt, completion: float(prompt == completion))
    assert fn(["a", "b"], ["a", "c"], [{}, {}]) == [1.0, 0.0]


class _Server:
    """A scorer on 127.0.0.1: replies by a script of (status, body or None = the real
    rewards, delay seconds), the last one repeating; records every request body."""

    def __init__(self, script):
        self.script, self.bodies = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                status, reply, delay = outer.script[min(len(outer.bodies) - 1, len(outer.script) - 1)]
                time.sleep(delay)
                if reply is None:
                    reply = {"rewards": [float(len(c)) for c in body["completions"]]}
                data = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_http_source_one_request_per_batch():
    with _Server([(200, None, 0)]) as server:
        src = RewardSource("http", server.url, retries=0)
        got = call_source(src, None, ["p1", "p2"], ["abc", "a"], [{"truncated": False}, {"truncated": True}])
    assert got == [3.0, 1.0]
    assert server.bodies == [{"prompts": ["p1", "p2"], "completions": ["abc", "a"],
                              "metadata": [{"truncated": False}, {"truncated": True}]}]


def test_http_source_retries_server_errors_then_succeeds():
    with _Server([(503, {"error": "busy"}, 0), (200, [5.0], 0)]) as server:
        assert call_source(RewardSource("http", server.url, retries=2), None, ["p"], ["c"], [{}]) == [5.0]
    assert len(server.bodies) == 2


def test_http_source_error_names_the_url_and_status():
    with _Server([(500, {"error": "boom"}, 0)]) as server:
        with pytest.raises(RewardSourceError, match=rf"reward source {server.url}: HTTP 500 .* after 3 tries"):
            call_source(RewardSource("http", server.url, retries=2), None, ["p"], ["c"], [{}])
    assert len(server.bodies) == 3  # bounded: 1 + retries
    with _Server([(404, {"error": "no"}, 0)]) as server:
        with pytest.raises(RewardSourceError, match=r"HTTP 404 .* after 1 try"):
            call_source(RewardSource("http", server.url, retries=2), None, ["p"], ["c"], [{}])
    assert len(server.bodies) == 1  # a client error is not retried


def test_http_source_timeout_and_bad_replies():
    with _Server([(200, None, 1.5)]) as server:
        with pytest.raises(RewardSourceError, match=rf"reward source {server.url}: no answer .* after 2 tries"):
            call_source(RewardSource("http", server.url, timeout=0.2, retries=1), None, ["p"], ["c"], [{}])
    with _Server([(200, {"rewards": [1.0, 2.0]}, 0)]) as server:
        with pytest.raises(RewardSourceError, match="expected a list of 1 floats"):
            call_source(RewardSource("http", server.url, retries=0), None, ["p"], ["c"], [{}])


def test_http_source_refused_connection():
    with _Server([(200, None, 0)]) as server:
        url = server.url
    with pytest.raises(RewardSourceError, match=rf"reward source {url}: no answer"):
        call_source(RewardSource("http", url, timeout=1, retries=0), None, ["p"], ["c"], [{}])
