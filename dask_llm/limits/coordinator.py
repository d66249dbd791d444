"""The job's ledger: one place that holds its rate and dollar budgets, and lends them out.

Why one place. A provider enforces ``rpm``/``tpm`` for the whole account, and
a job spans many processes. Splitting the limit evenly (0.1's design) leaves
capacity idle whenever the work is uneven: one process with the big
partition crawls at ``rate / P`` while the others have finished. A dollar
cap cannot be split evenly at all. So each job has one ``JobLedger`` that
lends capacity to the processes that have work *now*.

Where it lives (the user starts nothing):

* threads and the synchronous scheduler: in the process itself;
* dask's process pool: in the client, behind the job hub (``cluster.hub``);
* ``distributed``: on the scheduler, as a scheduler plugin
  (``LedgerPlugin``, registered by the client when the job is submitted) with
  one handler, ``dask_llm_lease``, that workers call.

Leases. Every member (a process running partitions of the job) calls
``lease`` about four times a second with what it used since its last call
(requests, tokens, dollars settled), whether requests are waiting for pacing
(it is *hungry*), and what it learned from response headers. It gets back its
request and token rates until its next call, a dollar allowance, and whether
the job must stop. No round trip per request: the member paces locally
(``limits.pacer``) within its rates and reserves from its allowance.

Providers. A job whose chains call two providers has each one's rates leased
apart, from a ledger of its own on the same coordinator (the job's id for its
default provider, OpenAI, whose ledger holds the budget too; ``job/anthropic``
for Anthropic's), lent by the job's work: a member's report carries each other
provider's use as a *lane* (``lanes``) and gets each one's rates back. The
limits told (``rpm``, ``tpm``, ``output_tpm``) hold for each provider apart: a
number the same for each, a mapping by provider name each its own (the member
sends each ledger its provider's, numbers); the limits learned are each
provider's own. Output tokens (``output_tpm``,
Anthropic's) are lent as requests and tokens are.

Allocation follows demand: members that use less than their share get what
they use (plus a quarter, to grow; what they use is the higher of their rate
since their last renewal and what they sent in their last second, since a
dependent chain's requests come in bursts), the rest is split evenly among
the hungry ones, except for the job's critical path. What no member asks
for (no one hungry: the job's last rows) goes to the members with rows still
to run, by backlog: lent 1% of the limit while quiet, such a member's next
burst was paced at one request a second until its lease followed, and the
last rows of a skewed job trickled out for ~10 s. Each member reports its
*backlog* (the rows of its running partitions not done) and the rows of each
partition it begins; the job's work left is the members' backlogs plus the
partitions not begun, counted at the median size of those begun. A member
whose backlog is a larger part of that work than an even share of the
limit is lent that part (``limit * backlog / work left``): the big partition
of a skewed job then finishes with the rest. Split evenly, it got a quarter
of the rate on four processes while the others had work, then ran alone at
what one process can send, which on two cores is less than the limit (the
tail of a skewed job). A member that knows no backlog (an older one), or a
job whose partitions are not known, is split as before. A partition rerun
after its worker died counts as begun twice: the work not begun is then
underestimated, and the members running partitions are lent a little more
than their part (a dead member's backlog leaves with its lease). Capacity
moves without overshoot. Rates are lent in paced
units: they sum to at most the limit less ``MARGIN``, and a member's strict
window (``limits.pacer``) admits its rate over ``1 - MARGIN`` in any second, so
what members may send sums to at most the limit. No member is granted more
than the paced limit minus what the others have *committed*, and a member's
commitment is the higher of its rate in force (what it may send until its
next renewal) and what it reported sending in the second before its last
report (what its requests of the last second still count at the provider),
times ``1 - MARGIN``. Its strict window sends only while it holds fewer than
its rate over ``1 - MARGIN``, and while a report is on its way only while
it holds fewer than it reported; its older requests only leave the window.
So the sum
over members of what they may send in any sliding second never exceeds the
limit: the job holds the limit over any sliding second. (Counted unscaled, a
member that used its window's full share committed more than its rate and
shaved the others' grants at every renewal: skewed partitions on 4 workers
took 1.11x the bound, 1.07x with the scaling, in one run.) A rate taken back
moves to the others as fast as its requests leave the provider's window:
counted at the most a member had sent at any report of the last 1.25 s, it
came back 2 s late, and a skewed job's big partition, begun when the first
small ones ended, waited that long for the rate they gave up.

Failure modes. A member that stops calling (a killed worker) loses its lease
after ``LEASE_TTL_S``; its rate stays committed one window more, then
returns to the others: within 3 s. A member whose renewals are late (a busy
process, a slow link) stops sending when its own lease runs out, counted
from before its last call, so it never uses a share already lent again. A
member added mid-job is hungry at its first call and gets a share as soon as
the others' surplus has aged: within about 1.5 s. If the coordinator itself
is lost (a scheduler restart, the client gone), members cannot renew: when
their lease expires they stop sending (a restarted scheduler has lost the
job's tasks anyway; a job without its client is abandoned). Budgets are not
persisted: a rerun starts a new ledger, and pays only for what its cache
does not hold.

Dollars. A member reserves each request's worst-case cost from its
allowance before sending it and settles on the reported usage. The
coordinator grants allowances only out of ``budget - spent - outstanding``,
so the sum of everything spent and everything reserved never exceeds the
budget. Spend can pass the cap only where a request costs more than it
reserved: with ``max_tokens`` set and prompts priced by their UTF-8 size (a
token is at least a byte), never; without ``max_tokens``, completions are
reserved at the largest seen so far (1,024 tokens before any is seen), and
the bound is the sum over requests in flight at the cap of what their
completions exceeded that. When a member cannot get the worst case of its
next request, it waits for requests in flight to settle (their reservations
are worst cases, their costs usually far less); when the settled spend
alone leaves no room for it, the job stops with "budget reached".
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dask_llm.core.runtime import part

log = logging.getLogger(__name__)

#: Members renew their lease this often (seconds).
RENEW_S = 0.25
#: A lease not renewed for this long has ended (its member is gone).
LEASE_TTL_S = 1.5
#: The provider's window: a rate given back is committed this much longer.
WINDOW_S = 1.0
#: Below the limit by this fraction: headroom for arrivals that bunch on their way
#: (the members' strict windows sum to the limit at any margin; docs/rate-limits.md,
#: "The margin", has what 3% and 2% measured).
MARGIN = 0.02
#: A member keeps what it used plus this fraction, so that it can grow.
GROWTH = 1.25
#: Seconds of spend an allowance covers (topped up at every renewal).
ALLOWANCE_S = 1.0
#: The sizes of the partitions begun most recently that estimate those not begun yet.
SIZES = 256


@dataclass
class Member:
    """One process's lease."""

    rate_req: float = 0.0
    rate_tok: float = 0.0
    rate_out: float = 0.0  # output tokens/s (a provider that limits them apart)
    used_req: float = 0.0  # requests/s over its last interval
    used_tok: float = 0.0
    used_out: float = 0.0
    hungry: bool = True
    backlog: int | None = None  # rows of its running partitions not done (None: not told)
    recent_req: float = 0.0  # requests it started in the second before its last report
    recent_tok: float = 0.0
    recent_out: float = 0.0
    expires: float = 0.0
    allowance: float = 0.0  # dollars it holds, reserved or not
    # What it sent in the second before its last report (requests, tokens, output tokens).
    sent_req: float = 0.0
    sent_tok: float = 0.0
    sent_out: float = 0.0

    def committed(self) -> tuple[float, float, float]:
        """The most it may send in any window that ends after its last report.

        Its strict window (``Pacer.admit``) sends a request only while fewer
        than its rate over ``1 - MARGIN`` started in the last second and a bit,
        and while its report is on its way it sends only while fewer than it
        reported (``Ledger.holding``). Its older requests only leave the window.
        So in any window ending after its report, it sends at most the higher of
        what it reported sending in the second before and the rate granted at
        that report. Both in paced units: what it sent counts times
        ``1 - MARGIN``. Its earlier reports do not matter: a rate taken back
        moves to the others as fast as its requests leave the provider's
        window. (Counting the most it sent at any report of the last 1.25 s held
        a rate taken back for 2 s: a skewed job's big partition, begun late,
        waited that long for the rate the others gave up.)
        """
        req = self.sent_req * (1.0 - MARGIN)
        tok = self.sent_tok * (1.0 - MARGIN)
        out = self.sent_out * (1.0 - MARGIN)
        return max(req, self.rate_req), max(tok, self.rate_tok), max(out, self.rate_out)


@dataclass
class JobLedger:
    """The budgets of one job and the members it lends them to."""

    rpm: float | None = None
    tpm: float | None = None
    output_tpm: float | None = None
    budget_usd: float | None = None
    learned_rpm: float | None = None
    learned_tpm: float | None = None
    learned_otpm: float | None = None
    spent_usd: float = 0.0
    stop: str | None = None
    members: dict[str, Member] = field(default_factory=dict)
    # Members gone, committed one window more: (until, requests/s, tokens/s, output tokens/s).
    ghosts: list[tuple[float, float, float, float]] = field(default_factory=list)
    touched: float = 0.0
    partitions: int | None = None  # the job's partitions (from its config)
    begun: int = 0  # partitions begun
    sizes: deque[int] = field(default_factory=lambda: deque(maxlen=SIZES))  # rows to run, last ones

    def work_left(self) -> float | None:
        """Rows of the job not done yet: in the members' partitions, and in those not begun.

        The partitions not begun are counted at the median size of those begun
        (the lower of the middle two): a skewed job's big partition does not make
        the others look big. Too low an estimate lends the big partition's member
        a little more than its part for a while; too high, less, and it finishes
        last, alone.
        None when it cannot be told: a member that does not report its backlog,
        or no partition begun yet.
        """
        if self.partitions is None or not self.sizes:
            return None
        running = 0
        for m in self.members.values():
            if m.backlog is None:
                return None
            running += m.backlog
        queued = max(0, self.partitions - self.begun) * statistics.median_low(self.sizes)
        return running + queued

    def limits(self) -> tuple[float | None, float | None, float | None]:
        """Requests/s, tokens/s and output tokens/s for the whole job (told, or learned),
        margin taken."""

        def lowest(told: float | None, learned: float | None) -> float | None:
            known = [x for x in (told, learned) if x]
            return min(known) / 60.0 * (1.0 - MARGIN) if known else None

        return (
            lowest(self.rpm, self.learned_rpm),
            lowest(self.tpm, self.learned_tpm),
            lowest(self.output_tpm, self.learned_otpm),
        )


class Coordinator:
    """The ledgers of every job that leases from this place. Thread-safe; clock injectable."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, JobLedger] = {}

    def lease(self, job: str, member: str, report: dict[str, Any]) -> dict[str, Any]:
        """Take ``member``'s report, return its lease (see the module docstring).

        ``report``: ``config`` (``rpm``, ``tpm``, ``output_tpm``, ``budget_usd``: the job's,
        sent by every member), ``used_req``/``used_tok``/``used_out`` (per second since the
        last call), ``hungry``, ``spent_usd`` (settled since the last call), ``allowance``
        (dollars it holds now, after settling), ``need_usd`` (what its next request may
        cost beyond that, 0 if it has enough), ``want_usd`` (about a second of its spend),
        ``learned_rpm``/``learned_tpm``/``learned_otpm``, and ``release`` (it has no more
        work). ``lanes``: ``{provider: {used_req, ..., learned_otpm}}`` of the requests to
        each other provider of the job, each leased from its own ledger (``job/provider``:
        the job's limits told hold for each provider apart, a lane's ``config`` its own
        limits told, over the job's; its work is the job's), its rates in the reply's
        ``lanes``.
        """
        now = self.clock()
        with self._lock:
            reply = self._lease(job, member, report, now)
            lanes = report.get("lanes")
            if lanes:
                work = self._jobs[job]
                shared = {name: report.get(name) for name in ("interval", "backlog", "release")}
                config = {**(report.get("config") or {}), "budget_usd": None}
                reply["lanes"] = {
                    name: self._lease(
                        f"{job}/{name}",
                        member,
                        # The lane's own limits told (``rpm={"anthropic": 50}``) over the
                        # job's (a member that sends none: the job's, for every provider).
                        {**shared, **sub, "config": {**config, **(sub.get("config") or {})}},
                        now,
                        work,
                    )
                    for name, sub in lanes.items()
                }
            return reply

    def _lease(
        self,
        job: str,
        member: str,
        report: dict[str, Any],
        now: float,
        work: JobLedger | None = None,
    ) -> dict[str, Any]:
        """One ledger's part of ``lease`` (its lock held); ``work``: the job's ledger, whose
        partitions a lane's ledger lends by."""
        ledger = self._jobs.get(job)
        if ledger is None:
            self._forget_idle(now)
            config = report.get("config") or {}
            ledger = self._jobs[job] = JobLedger(
                rpm=config.get("rpm"),
                tpm=config.get("tpm"),
                output_tpm=config.get("output_tpm"),
                budget_usd=config.get("budget_usd"),
                partitions=config.get("partitions"),
            )
        if work is not None:
            ledger.partitions, ledger.begun, ledger.sizes = work.partitions, work.begun, work.sizes
        ledger.touched = now
        for name in ("learned_rpm", "learned_tpm", "learned_otpm"):
            value = report.get(name)
            if value:
                old = getattr(ledger, name)
                setattr(ledger, name, value if old is None else min(old, value))
        self._expire(ledger, now)
        me = ledger.members.get(member)
        if me is None:
            me = ledger.members[member] = Member()
        ledger.spent_usd += float(report.get("spent_usd") or 0.0)
        me.allowance = float(report.get("allowance") or 0.0)
        for rows in report.get("begun") or ():
            ledger.begun += 1
            ledger.sizes.append(int(rows))
        if report.get("release"):
            _sent(me, report)
            ledger.ghosts.append((now + WINDOW_S + RENEW_S, *me.committed()))
            del ledger.members[member]
            return {
                "rate_req": 0.0,
                "rate_tok": 0.0,
                "rate_out": 0.0,
                "grant_usd": 0.0,
                "stop": ledger.stop,
            }
        me.used_req = float(report.get("used_req") or 0.0)
        me.used_tok = float(report.get("used_tok") or 0.0)
        me.used_out = float(report.get("used_out") or 0.0)
        _sent(me, report)
        me.hungry = bool(report.get("hungry", True))
        recent = report.get("sent_1s") or (0.0, 0.0)
        me.recent_req, me.recent_tok = float(recent[0]) / WINDOW_S, float(recent[1]) / WINDOW_S
        me.recent_out = float(report.get("sent_out_1s") or 0.0) / WINDOW_S
        backlog = report.get("backlog")
        me.backlog = None if backlog is None else int(backlog)
        me.expires = now + LEASE_TTL_S
        me.rate_req, me.rate_tok, me.rate_out = self._rates(ledger, member)
        grant = self._dollars(
            ledger,
            me,
            need=float(report.get("need_usd") or 0.0),
            want=float(report.get("want_usd") or 0.0),
        )
        limit_req, limit_tok, limit_out = ledger.limits()
        return {
            "rate_req": me.rate_req if limit_req is not None else None,
            "rate_tok": me.rate_tok if limit_tok is not None else None,
            "rate_out": me.rate_out if limit_out is not None else None,
            "grant_usd": grant,
            "spent_usd": ledger.spent_usd,
            "budget_usd": ledger.budget_usd,
            "stop": ledger.stop,
            "members": len(ledger.members),
        }

    def snapshot(self, job: str) -> dict[str, Any] | None:
        """The job's state, for tests and the run summary."""
        with self._lock:
            ledger = self._jobs.get(job)
            if ledger is None:
                return None
            return {
                "members": {m: (x.rate_req, x.rate_tok) for m, x in ledger.members.items()},
                "committed_req": sum(x.committed()[0] for x in ledger.members.values()),
                "limits": ledger.limits(),
                "spent_usd": ledger.spent_usd,
                "outstanding_usd": sum(x.allowance for x in ledger.members.values()),
                "stop": ledger.stop,
            }

    # -- the arithmetic ------------------------------------------------------------------------
    def _expire(self, ledger: JobLedger, now: float) -> None:
        for name in [m for m, x in ledger.members.items() if x.expires and x.expires < now]:
            gone = ledger.members.pop(name)
            ledger.ghosts.append((now + WINDOW_S, *gone.committed()))
            # Its allowance was reserved for requests it can no longer settle: the
            # worst case is that they were all paid for.
            ledger.spent_usd += gone.allowance
        ledger.ghosts = [g for g in ledger.ghosts if g[0] > now]

    def _rates(self, ledger: JobLedger, member: str) -> tuple[float, float, float]:
        limit_req, limit_tok, limit_out = ledger.limits()
        work = ledger.work_left()  # once per lease: every kind splits the same work
        target_req = _whole_windows(_shares(ledger, limit_req, "req", work)).get(member, 0.0)
        target_tok = _shares(ledger, limit_tok, "tok", work).get(member, 0.0)
        target_out = _shares(ledger, limit_out, "out", work).get(member, 0.0)
        # No more than what the others may still be using leaves free.
        others_req = others_tok = others_out = 0.0
        for name, other in ledger.members.items():
            if name != member:
                req, tok, out = other.committed()
                others_req += req
                others_tok += tok
                others_out += out
        for _, req, tok, out in ledger.ghosts:
            others_req += req
            others_tok += tok
            others_out += out
        free_req = max(0.0, (limit_req or 0.0) - others_req)
        free_tok = max(0.0, (limit_tok or 0.0) - others_tok)
        free_out = max(0.0, (limit_out or 0.0) - others_out)
        # Whole windows (see ``_whole_windows``), no more than the others leave free.
        unit = 1.0 - MARGIN
        rate_req = min(target_req, math.floor(free_req / unit + 1e-9) * unit)
        return rate_req, min(target_tok, free_tok), min(target_out, free_out)

    def _dollars(self, ledger: JobLedger, me: Member, *, need: float, want: float) -> float:
        """Top ``me``'s allowance up toward ``want``; stop the job if not even ``need`` fits.

        ``need``: what its next request may cost, beyond what it holds (0: it has
        enough); ``want``: about a second of its recent spend.
        """
        if ledger.budget_usd is None:
            return math.inf
        outstanding = sum(m.allowance for m in ledger.members.values())
        left = max(0.0, ledger.budget_usd - ledger.spent_usd - outstanding)
        grant = min(left, max(want, need))
        if need > 0 and grant < need * (1 - 1e-9):  # sums of floats: a hair is not a cent
            if ledger.budget_usd - ledger.spent_usd < need * (1 - 1e-9) and ledger.stop is None:
                # Even if every reservation in flight settled at nothing, the next
                # request would not fit: the budget is spent.
                ledger.stop = (
                    f"budget reached: ${ledger.spent_usd:,.4f} spent of the "
                    f"${ledger.budget_usd:,.4f} budget"
                )
            return 0.0  # else: wait for requests in flight to settle and free their reserve
        me.allowance += grant
        return grant

    def _forget_idle(self, now: float) -> None:
        for job in [j for j, x in self._jobs.items() if now - x.touched > 600.0]:
            del self._jobs[job]


def _sent(me: Member, report: dict[str, Any]) -> None:
    """Record what ``me`` sent in the second before its report.

    ``sent_1s``: requests and tokens it started in that second, counted as
    the provider counts them. Without it (an older member), the averages over
    its interval. A renewal that came late leaves seconds unreported, in which
    it may have sent at its rate in force: then what its strict window admits
    at that rate is recorded (sent, like the rest, not paced).
    """
    sent = report.get("sent_1s")
    if sent is not None:
        used_req, used_tok = float(sent[0]) / WINDOW_S, float(sent[1]) / WINDOW_S
    else:
        used_req = float(report.get("used_req") or 0.0)
        used_tok = float(report.get("used_tok") or 0.0)
    sent_out = report.get("sent_out_1s")
    used_out = float(report.get("used_out") or 0.0) if sent_out is None else sent_out / WINDOW_S
    if float(report.get("interval") or math.inf) > 2 * RENEW_S:
        used_req = max(used_req, me.rate_req / (1.0 - MARGIN))
        used_tok = max(used_tok, me.rate_tok / (1.0 - MARGIN))
        used_out = max(used_out, me.rate_out / (1.0 - MARGIN))
    me.sent_req, me.sent_tok, me.sent_out = used_req, used_tok, used_out


def _whole_windows(shares: dict[str, float]) -> dict[str, float]:
    """Request rates whose strict windows hold whole numbers of requests.

    A member's window (``Pacer.admit``) holds at most its rate over
    ``1 - MARGIN`` requests, rounded down: a rate of 8.4/s let 8 through in
    1.02 s, 7.8/s, and three small members of a skewed job lost 1.7 requests a
    second between them. So rates are granted in whole windows (times
    ``1 - MARGIN``): each share rounded down, and the requests that the
    rounding leaves go to the largest remainders (three members due a third
    of 100 each get 34, 33 and 33). A member due anything gets one at least.
    """
    unit = 1.0 - MARGIN
    windows = {name: share / unit for name, share in shares.items()}
    whole = {name: math.floor(w + 1e-9) for name, w in windows.items()}
    spare = math.floor(sum(windows.values()) + 1e-9) - sum(whole.values())
    by_remainder = sorted(windows, key=lambda n: (whole[n] - windows[n], n))
    for name in by_remainder[: max(0, spare)]:
        whole[name] += 1
    return {name: max(n, 1 if windows[name] > 0 else 0) * unit for name, n in whole.items()}


def _shares(
    ledger: JobLedger, limit: float | None, kind: str, work: float | None
) -> dict[str, float]:
    """The members' shares of ``limit``: water-filling by demand (see the module docstring).

    ``work``: the job's rows not done (``JobLedger.work_left``).
    """
    if limit is None:
        return {}
    members = ledger.members
    wants: dict[str, float] = {}
    for name, m in members.items():
        used, recent = {
            "req": (m.used_req, m.recent_req),
            "tok": (m.used_tok, m.recent_tok),
            "out": (m.used_out, m.recent_out),
        }[kind]
        # What it sent in its last second, not only since its last renewal: demand comes
        # in bursts (a dependent chain's requests when the answers are back).
        used = max(used, recent * (1 - MARGIN))
        wants[name] = math.inf if m.hungry else max(used * GROWTH, limit * 0.01)
    left = limit
    open_members = dict(wants)
    share: dict[str, float] = {}
    if work:
        # The critical path: a member whose partitions hold more of the job's remaining
        # work than an even share would finish by the job's end gets its part of the
        # limit, so that it does not finish last, alone (and short of CPU).
        for name in sorted(open_members, key=lambda n: -(members[n].backlog or 0)):
            need = limit * (members[name].backlog or 0) / work
            if len(open_members) <= 1 or need <= left / len(open_members):
                break
            share[name] = min(need, open_members.pop(name))
            left -= share[name]
    while open_members:
        even = left / len(open_members)
        small = {n: w for n, w in open_members.items() if w <= even}
        if not small:
            for name in open_members:
                share[name] = even
            left = 0.0
            break
        for name, w in small.items():
            share[name] = w
            left -= w
            del open_members[name]
    backlogs = {n: float(m.backlog) for n, m in members.items() if m.backlog}
    if left > 0 and backlogs:
        # What no member asks for now goes to those with rows still to run, by backlog.
        # Their requests come in bursts (a dependent chain's, when answers are back):
        # lent 1% of the limit while quiet, a burst was paced at that rate for the
        # ~1 s it takes a lease to follow, and the job's last rows trickled out at
        # one request a second. Unused, it moves to the others at their next renewal.
        total = sum(backlogs.values())
        for name, rows in backlogs.items():
            share[name] = share.get(name, 0.0) + left * rows / total
    return share


def local_coordinator() -> Coordinator:
    """This process's coordinator (threads, the synchronous scheduler, a process pool's
    client): a part of the process's ``core.runtime``; its ledgers go as their jobs end."""
    return part(Coordinator)


# -- distributed: the coordinator on the scheduler ------------------------------------------------
PLUGIN_NAME = "dask-llm-ledger"
HANDLER = "dask_llm_lease"
