"""Run a real z4j engine adapter (1.13.0, Apache-2.0) on an in-memory engine, for tests.

usage: engine_agent.py ENGINE BRAIN_URL TOKEN SECRET PROJECT SECONDS [SCENARIO]

ENGINE is celery, dramatiq, huey or taskiq; the adapter and its engine run in
this process (z4j-bare's agent runtime in its own thread), unchanged:

- celery: memory:// broker, cache+memory:// backend, result_extended (so a
  retry by reference finds the args), a solo worker in the main thread;
- dramatiq: StubBroker and a Worker with two threads;
- huey: MemoryHuey with a two-thread consumer;
- taskiq: InMemoryBroker with SimpleRetryMiddleware.

SCENARIO ``lifecycle`` (the default) enqueues three tasks, with fixed ids:
``ok`` returns x*2 (x=21), ``boom`` raises ValueError("boom"), ``flaky``
retries twice and then fails. Where the engine can cancel (celery, huey) a
``later`` task is scheduled five minutes out, for cancel_task; celery also
leaves three messages on a queue no worker reads ("other"), for purge_queue.
SCENARIO ``idle`` enqueues nothing (its "enqueued" milestone is empty).
SCENARIO ``schedules`` (huey only) enqueues nothing either, and adds the
z4j-hueyperiodic scheduler adapter with two periodic tasks, ``every5``
(every five minutes) and ``nightly`` (03:00), whose dashboard overrides
(enable, disable, delete) it keeps in ``$Z4J_HOME/huey-schedules.sqlite``
(z4j-bare's NativeScheduleControl), so they outlive a restart.
PROJECT is the project slug z4j-bare reports; the brain knows the project
from the token.

Milestones go to stdout, one JSON object a line, flushed, so a test can wait
for them instead of sleeping: {"ready": ...} once the runtime is up (signals
wired), {"enqueued": ...} with the tasks' ids and names, {"stopping": ...}
and {"stopped": true} at the end. The process serves commands until SECONDS
pass or it gets SIGTERM, then stops its worker and the runtime. Logs go to
stderr. The caller sets Z4J_HOME (a private directory: the agent's buffer).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

ENGINES = ("celery", "dramatiq", "huey", "taskiq")
SCENARIOS = ("lifecycle", "idle", "schedules")
LATER_SECONDS = 300  # the "later" task never runs while a test lasts
OTHER_QUEUE, OTHER_MESSAGES = "other", 3


def say(**milestone: Any) -> None:
    """One milestone line on stdout."""
    sys.stdout.write(json.dumps(milestone, sort_keys=True) + "\n")
    sys.stdout.flush()


class Run:
    def __init__(self, argv: list[str]) -> None:
        if len(argv) not in (6, 7) or argv[0] not in ENGINES:
            sys.exit(__doc__)
        self.engine, self.url, self.token, self.secret, self.project = argv[:5]
        self.seconds = float(argv[5])
        self.scenario = argv[6] if len(argv) == 7 else "lifecycle"
        if self.scenario not in SCENARIOS:
            sys.exit(f"SCENARIO: one of {', '.join(SCENARIOS)}")
        self.stop = threading.Event()
        self.stop_reason = "deadline"

    @property
    def lifecycle(self) -> bool:
        return self.scenario == "lifecycle"

    def install(self, adapter: Any, schedulers: list[Any] | None = None) -> Any:
        from z4j_bare import install_agent

        # Returns once the runtime's loop is up and connect_signals has run;
        # connecting to the brain goes on in the background (events buffer).
        runtime = install_agent(
            engines=[adapter],
            schedulers=schedulers or [],
            brain_url=self.url,
            token=self.token,
            project_id=self.project,
            hmac_secret=self.secret,
            agent_name=f"matrix-{self.engine}",
        )
        say(ready=True, engine=self.engine, pid=os.getpid())
        return runtime

    def on_sigterm(self) -> None:
        """SIGTERM ends the wait early (a test that is done need not wait SECONDS)."""

        def handler(signum: int, frame: Any) -> None:
            self.stop_reason = "signal"
            self.stop.set()

        signal.signal(signal.SIGTERM, handler)

    def serve(self) -> None:
        """Block until SECONDS pass or SIGTERM."""
        self.stop.wait(self.seconds)
        say(stopping=True, reason=self.stop_reason)


def enqueued(tasks: dict[str, tuple[str, str]], **extra: Any) -> None:
    """The "enqueued" milestone: {key: {"id", "name"}}; empty for SCENARIO idle."""
    say(enqueued={k: {"id": i, "name": n} for k, (i, n) in tasks.items()}, **extra)


# -- celery --------------------------------------------------------------------------------


def run_celery(run: Run) -> None:
    from celery import Celery
    from z4j_celery import CeleryEngineAdapter
    from z4j_celery.events import broker as broker_events

    app = Celery("matrix", broker="memory://", backend="cache+memory://")
    app.conf.worker_pool = "solo"  # read by the adapter's pool detection
    app.conf.task_default_queue = "celery"
    app.conf.result_extended = True  # retry_task by reference reads args from the backend
    app.conf.worker_hijack_root_logger = False
    app.conf.worker_redirect_stdouts = False  # stdout is for milestones

    @app.task(name="matrix.ok")
    def ok(x: int) -> int:
        return x * 2

    @app.task(name="matrix.boom")
    def boom() -> None:
        raise ValueError("boom")

    @app.task(name="matrix.flaky", bind=True, max_retries=2, default_retry_delay=0)
    def flaky(self: Any) -> None:
        raise self.retry(exc=RuntimeError("flaky"), countdown=0)

    # The adapter's broker-events monitor (a second feed beside the signal
    # hooks) binds its queue on a thread of its own. Events published before
    # it is bound are lost on a fanout exchange, so wait for its log line.
    monitor_bound = threading.Event()

    class _Bound(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "monitor connected to broker" in record.getMessage():
                monitor_bound.set()

    monitor_log = broker_events.logger
    monitor_log.addHandler(_Bound(logging.INFO))
    monitor_log.setLevel(logging.INFO)

    runtime = run.install(CeleryEngineAdapter(celery_app=app))
    if not monitor_bound.wait(30):
        say(warning="the broker-events monitor did not bind within 30 s")
    if run.lifecycle:
        ok.apply_async(args=[21], task_id="c-ok")
        boom.apply_async(task_id="c-boom")
        flaky.apply_async(task_id="c-flaky")
        ok.apply_async(args=[1], countdown=LATER_SECONDS, task_id="c-later")
        for _ in range(OTHER_MESSAGES):
            app.send_task("matrix.ok", args=[1], queue=OTHER_QUEUE)
        enqueued(
            {
                "ok": ("c-ok", "matrix.ok"),
                "boom": ("c-boom", "matrix.boom"),
                "flaky": ("c-flaky", "matrix.flaky"),
                "later": ("c-later", "matrix.ok"),
            },
            queued={OTHER_QUEUE: OTHER_MESSAGES},
        )
    else:
        enqueued({})

    # The solo worker owns the main thread (and installs its own SIGTERM
    # handler: a warm shutdown). The deadline sends us SIGTERM too.
    def deadline() -> None:
        if not run.stop.wait(run.seconds):
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=deadline, daemon=True).start()
    worker = app.Worker(
        pool="solo",
        concurrency=1,
        queues=["celery"],  # never "other": its messages wait for purge_queue
        hostname="matrix@localhost",
        loglevel="WARNING",
        quiet=True,  # no banner on stdout
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
    )
    with contextlib.suppress(SystemExit):
        worker.start()
    run.stop.set()
    say(stopping=True, reason="worker stopped")
    runtime.stop()


# -- dramatiq ------------------------------------------------------------------------------


def run_dramatiq(run: Run) -> None:
    import dramatiq
    from dramatiq.brokers.stub import StubBroker
    from z4j_dramatiq import DramatiqEngineAdapter

    broker = StubBroker()
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)

    @dramatiq.actor(max_retries=0)
    def ok(x: int) -> int:
        return x * 2

    @dramatiq.actor(max_retries=0)
    def boom() -> None:
        raise ValueError("boom")

    @dramatiq.actor(max_retries=2, min_backoff=10, max_backoff=20)
    def flaky() -> None:
        raise RuntimeError("flaky")

    runtime = run.install(DramatiqEngineAdapter(broker=broker))
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    run.on_sigterm()
    if run.lifecycle:
        # A message's id is its task id: set it, then enqueue as send() does.
        ids = {"ok": "d-ok", "boom": "d-boom", "flaky": "d-flaky"}
        broker.enqueue(ok.message(21).copy(message_id=ids["ok"]))
        broker.enqueue(boom.message().copy(message_id=ids["boom"]))
        broker.enqueue(flaky.message().copy(message_id=ids["flaky"]))
        enqueued({k: (i, k) for k, i in ids.items()})
    else:
        enqueued({})
    run.serve()
    worker.stop()
    runtime.stop()


# -- huey ----------------------------------------------------------------------------------


def run_huey(run: Run) -> None:
    from huey import MemoryHuey
    from z4j_huey import HueyEngineAdapter

    huey = MemoryHuey("matrix", utc=True)

    @huey.task()
    def ok(x: int) -> int:
        return x * 2

    @huey.task()
    def boom() -> None:
        raise ValueError("boom")

    @huey.task(retries=2, retry_delay=0)
    def flaky() -> None:
        raise RuntimeError("flaky")

    schedulers = []
    if run.scenario == "schedules":
        from pathlib import Path

        from huey import crontab
        from z4j_bare import NativeScheduleControl
        from z4j_hueyperiodic import HueyPeriodicAdapter

        @huey.periodic_task(crontab(minute="*/5"))
        def every5() -> int:
            return 5

        @huey.periodic_task(crontab(minute="0", hour="3"))
        def nightly() -> int:
            return 3

        control = NativeScheduleControl(Path(os.environ["Z4J_HOME"]) / "huey-schedules.sqlite")
        schedulers.append(HueyPeriodicAdapter(huey=huey, control=control))

    runtime = run.install(HueyEngineAdapter(huey=huey), schedulers)
    consumer = huey.create_consumer(
        workers=2, worker_type="thread", periodic=False, check_worker_health=False
    )
    consumer.start()
    run.on_sigterm()  # after start(): the consumer sets handlers of its own
    if run.lifecycle:
        ok(21, id="h-ok")
        boom(id="h-boom")
        flaky(id="h-flaky")
        ok.schedule(args=(1,), delay=LATER_SECONDS, id="h-later")
        # Events name the function; retry_task takes that or the registry key.
        enqueued(
            {
                "ok": ("h-ok", "ok"),
                "boom": ("h-boom", "boom"),
                "flaky": ("h-flaky", "flaky"),
                "later": ("h-later", "ok"),
            }
        )
    else:
        enqueued({})
    run.serve()
    consumer.stop(graceful=False)
    runtime.stop()


# -- taskiq --------------------------------------------------------------------------------


def run_taskiq(run: Run) -> None:
    import asyncio

    from taskiq import InMemoryBroker
    from taskiq.middlewares import SimpleRetryMiddleware
    from z4j_taskiq import TaskiqEngineAdapter, attach_to_broker

    broker = InMemoryBroker().with_middlewares(SimpleRetryMiddleware(default_retry_count=3))
    adapter = TaskiqEngineAdapter(broker=broker)
    attach_to_broker(broker, adapter=adapter)  # before startup: binds submit_task's loop

    @broker.task(task_name="matrix.ok")
    async def ok(x: int) -> int:
        return x * 2

    @broker.task(task_name="matrix.boom")
    async def boom() -> None:
        raise ValueError("boom")

    # taskiq counts attempts: three of them are two retries.
    @broker.task(task_name="matrix.flaky", retry_on_error=True, max_retries=3)
    async def flaky() -> None:
        raise RuntimeError("flaky")

    async def main() -> None:
        await broker.startup()
        runtime = run.install(adapter)
        done = asyncio.Event()

        def on_term() -> None:
            run.stop_reason = "signal"
            done.set()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_term)
        if run.lifecycle:
            ids = {"ok": "t-ok", "boom": "t-boom", "flaky": "t-flaky"}
            await ok.kicker().with_task_id(ids["ok"]).kiq(21)
            await boom.kicker().with_task_id(ids["boom"]).kiq()
            await flaky.kicker().with_task_id(ids["flaky"]).kiq()
            enqueued({k: (i, f"matrix.{k}") for k, i in ids.items()})
        else:
            enqueued({})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), run.seconds)
        say(stopping=True, reason=run.stop_reason)
        runtime.stop()
        await broker.shutdown()

    asyncio.run(main())


RUNNERS: dict[str, Callable[[Run], None]] = {
    "celery": run_celery,
    "dramatiq": run_dramatiq,
    "huey": run_huey,
    "taskiq": run_taskiq,
}


def main() -> None:
    run = Run(sys.argv[1:])
    if run.scenario == "schedules" and run.engine != "huey":
        sys.exit("SCENARIO schedules: huey only (z4j-hueyperiodic)")
    # purge_queue reads the project secret from the environment, not from
    # install_agent's hmac_secret: without this every purge fails.
    os.environ["Z4J_HMAC_SECRET"] = run.secret
    logging.basicConfig(level=os.environ.get("MATRIX_LOG", "WARNING"), stream=sys.stderr)
    RUNNERS[run.engine](run)
    say(stopped=True)


if __name__ == "__main__":
    main()
