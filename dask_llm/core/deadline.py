"""``enrich(..., deadline=)``: finish by then, at the least cost, across the price tiers.

Three ways to ask for the same answer, cheapest first: the Batch API (half the
list price, within a window the provider promises only as 24 h), Flex
processing (the Batch price, online, slower, sometimes "resource unavailable")
and list price. The planner picks, with what it knows, the cheapest that can
still finish in time:

1. **Batch** when the deadline leaves room for every round of the chains
   (``rounds x batch_turnaround``) *and* for a safe tail: the batches are
   cancelled at a cut-off (``BatchPolicy.deadline`` rules, below) early enough
   that whatever they have not finished can still go online, at list-price
   speed, by the deadline. The cut-off is ``deadline - tail``, with ``tail``
   the time the job's requests take online at its rate (``2 x latency +
   requests / rate + rounds x latency``: the pacing waits for its first two
   answers before it sends at the full rate); the batch's own cancel is started ``min(cut-off / 4,
   600)`` seconds before the cut-off (``transport.batch``: OpenAI takes up to
   10 minutes to cancel, and lines a cancel finished are read only once it is
   done). The bound: lines go online by the cut-off, and are back by the
   deadline at the rate assumed.
2. **Flex** for what goes online (all of it when the batch cannot make it, or
   what a cancelled batch did not finish), as long as a Flex request sent now
   is back in time: ``now + flex_latency x (1 + retries for unavailability) +
   (rounds - 1) x latency <= deadline`` (the later rounds of its row at list
   price). The Flex latency is the larger of the one assumed and the one
   measured in this process so far (``TierChooser.observe``).
3. **List price** for requests sent after that moment: the rate limit is the
   same for both (a request sent at list price is not faster to send, only
   faster to answer), so what cannot wait for a Flex answer is what is sent
   last.

What is assumed is said (``Deadline``'s fields), and ``estimate(deadline=)``
shows the plan it gives. A deadline no tier can meet is planned at list price
throughout and the estimate says by how much it is missed.

**Re-planned as the job learns** (what was assumed is a guess; what the job sees
is not):

* A batch's progress, read on each poll (``done`` of ``total`` lines, the
  provider's ``request_counts``), projects its end at its pace so far
  (``projected_end``); with later rounds of the chains, each takes at least as
  long. When that end is after the moment its cancel would begin anyway, the
  batch cannot make it (``batch_late``) and is cancelled at once, not at the
  cut-off: Flex costs what the Batch API does, so the lines it would still have
  finished by then cost the same by Flex, and the time won goes to them (more
  by Flex, less at list price, and the provider's cancel has longer to finish).
  The lines it finished are read once the cancel is done (nothing is paid
  twice); the rest go online. Before any line is done, the batch is late once
  it has run longer than the turnaround assumed. A batch still validating is
  late once even the turnaround assumed, counted from now, would end its
  rounds after that moment (``now + rounds_left x batch_turnaround >
  cancel_at``): its validation has eaten the plan's slack. It is cancelled
  while validating (no line done, nothing paid) and every line goes online.
  Only batches whose rest can go by Flex (OpenAI's): an Anthropic batch's rest
  would go at list price, so it keeps its cut-off.
* Flex's latency and its share of "resource unavailable" answers are measured
  as they come (``TierChooser.observe``); the larger of each and the one
  assumed makes a Flex request's expected time, so the moment after which a
  request goes at list price moves earlier when Flex turns out slower or less
  available than assumed.
* The online rate and the list-price latency: the tail was planned with the
  rate told (``rpm=``) or assumed and the latency assumed. Each online answer
  of the job in this process is measured (``TierChooser.observe``: its latency
  at list price; ``TierChooser.announced``: the limits its headers announce,
  a 429's too: ``rpm / 60``, or ``tpm / 60`` over the tokens an answer used on
  average, the lower, which is the rate the pacing sends at). From the first
  such answer on, the cut-off is ``deadline - tail`` with the lower rate and the
  larger latency (``TierChooser.cutoff_at``, read by the batch sender at each
  poll: never later than planned), and so is the moment its cancel begins (the
  lead stays as planned); a batch past it is cancelled at once. Flex's last
  safe moment uses the larger latency for its row's later rounds
  (``TierChooser.tier``), and every re-plan (``TierChooser.plan``) both. The
  tail is re-planned for the job's requests as planned, not for what is left:
  an earlier cut-off than needed, never a later one. A job all by batch sends
  nothing online before its cut-off, so it has nothing to measure there: its
  cut-off stays at the rate told or assumed (tell ``rpm=`` what the account
  allows). Its online answers come from lines a batch did not answer (an
  expired or failed line, a batch cancelled early) and from the partitions of
  the job that went online; a provider that announces no limit leaves the rate
  as told.

**The bound with later rounds** (dependent chains). A batch is judged against
the moment its cancel would begin, not against the deadline, and so is every
round after it (``batch_late``): the plan chose the Batch API only when every
round ends before the cancel begins, and the tail after the cut-off is sized
for the whole job online (every round's requests, ``rounds x latency``).
Judged against the deadline instead, a batch whose next round ends after the
cancel began would keep running only for that round to be cancelled at the
cut-off: its rest would go online then, where it could have gone by Flex now
at the same price. Each later round is counted at least as long as the
turnaround assumed and as this round from its submission to its projected end,
its validation included (a later round validates as this one did; until
2026-12-07 it was counted from the end of validation, and a long validation
was not counted twice). What is not counted: this round's finalization after
its last line and the moments between rounds (reading the results, the chains
building the next requests, the upload); the cancel's lead (``CANCEL_SHARE``)
covers them. A round is a submission of the partition (``wave``): a request
retried online after a 429 joins the next submission, so a wave may hold lines
of an earlier round, whose later rounds are then not counted.
"""

from __future__ import annotations

import datetime as _dt
import math
import threading
import time
from dataclasses import dataclass
from typing import Final, Literal

#: What the providers promise for a batch (OpenAI's ``completion_window``).
BATCH_WINDOW_S: Final = 24 * 3600.0
#: A batch's cancel is started this share of the cut-off before it, at most CANCEL_MAX_S
#: (the same rule as ``BatchPolicy(deadline=)``).
CANCEL_SHARE: Final = 0.25
CANCEL_MAX_S: Final = 600.0
#: Answers the pacing waits for at the start before it sends at the full rate (measured
#: against the simulator: its first requests go one after another until two are back).
WARMUP_ANSWERS: Final = 2
#: The share of Flex requests answered "resource unavailable", as measured, starts from
#: the share assumed as if seen on this many requests: the first few answers alone (one
#: or two unavailable, by chance) would move it by a lot.
UNAVAILABLE_PRIOR: Final = 4
#: The largest share taken: above it, Flex is as good as gone.
MAX_UNAVAILABLE: Final = 0.95

Tier = Literal["batch", "flex", "default"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Deadline:
    """When a job must be done, and what the planner assumes to get there.

    ``enrich(deadline=...)`` takes one, or a ``datetime.timedelta``, a number of
    seconds from now, or an aware ``datetime``.

    Args:
        at: the deadline, in seconds since the epoch (``time.time()``).
        batch_turnaround: seconds a batch takes, submission to results (default: the
            24 h the provider promises; set what you measured).
        flex_latency: seconds a Flex answer takes (default 60; the larger of this and
            what the job measures is used).
        latency: seconds an answer at list price takes (default 10).
        flex_unavailable: share of Flex requests answered "resource unavailable" (each
            retried; a request's expected time grows by ``1 / (1 - share)``).
    """

    at: float
    batch_turnaround: float = BATCH_WINDOW_S
    flex_latency: float = 60.0
    latency: float = 10.0
    flex_unavailable: float = 0.0

    def __post_init__(self) -> None:
        for name in ("batch_turnaround", "flex_latency", "latency"):
            if getattr(self, name) < 0:
                raise ValueError(f"Deadline({name}=) must be >= 0 seconds")
        if not 0.0 <= self.flex_unavailable < 1.0:
            raise ValueError("Deadline(flex_unavailable=) is a share in [0, 1)")

    @classmethod
    def of(cls, value: object, *, now: float | None = None) -> Deadline:
        """``value`` (a ``Deadline``, ``timedelta``, seconds or aware ``datetime``) as one.

        Raises ``TypeError`` for another type and ``ValueError`` for a naive datetime
        or a deadline already past.
        """
        now = time.time() if now is None else now
        if isinstance(value, Deadline):
            out = value
        elif isinstance(value, _dt.timedelta):
            out = cls(at=now + value.total_seconds())
        elif isinstance(value, _dt.datetime):
            if value.tzinfo is None or value.utcoffset() is None:
                raise ValueError(
                    "deadline= takes an aware datetime (with a tzinfo), a timedelta or seconds"
                )
            out = cls(at=value.timestamp())
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out = cls(at=now + float(value))
        else:
            raise TypeError(
                f"deadline= takes seconds, a timedelta, an aware datetime or a dask_llm.Deadline, "
                f"not {type(value).__name__}"
            )
        if out.at <= now:
            raise ValueError("deadline= is already past")
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class TierPlan:
    """What the planner chose at ``now``: see the module docstring.

    ``batch_s``: seconds from ``now`` to the batch cut-off (None: no batch);
    ``flex_until``: the epoch time after which online requests go at list price;
    ``flex_share``: the share of online requests expected to go by Flex (if all
    went online); ``finish_s``: seconds from ``now`` the plan expects to finish in;
    ``meets``: whether that is by the deadline; ``flex_first``: the first requests (the
    pacing's warm-up) may go by Flex too.
    """

    deadline: Deadline
    now: float
    batch_s: float | None
    flex_until: float
    flex_share: float
    finish_s: float
    meets: bool
    flex_first: bool = True

    @property
    def tier(self) -> Tier:
        """The first tier the plan uses."""
        if self.batch_s is not None:
            return "batch"
        return "flex" if self.flex_share > 0 else "default"

    def cost_share(self, *, batch_discount: float = 0.5) -> float:
        """The plan's cost as a share of list price, if every batch line finished in time
        (batch) or every request went online (Flex, then list)."""
        if self.batch_s is not None:
            return batch_discount
        return self.flex_share * batch_discount + (1.0 - self.flex_share)

    def describe(self) -> str:
        left = self.deadline.at - self.now
        if self.batch_s is not None:
            head = (
                f"Batch API, cut off {self.batch_s:,.0f} s from now (what is not back then "
                f"goes online by Flex, then list price)"
            )
        elif self.flex_share >= 1.0:
            head = "online by Flex"
        elif self.flex_share > 0:
            head = f"online: {self.flex_share:.0%} by Flex, the rest at list price"
        else:
            head = "online at list price"
        verdict = "" if self.meets else f"; expected to miss it by {self.finish_s - left:,.0f} s"
        return (
            f"deadline in {left:,.0f} s: {head}, about {self.cost_share():.2f}x list price{verdict}"
        )


def plan_tiers(
    deadline: Deadline,
    *,
    now: float,
    requests: int,
    rounds: int,
    rate_per_s: float,
    flex_latency: float | None = None,
    flex_unavailable: float | None = None,
    latency: float | None = None,
    batch: bool = True,
) -> TierPlan:
    """The cheapest plan that finishes ``requests`` (over ``rounds`` dependent rounds) by
    ``deadline``, sending at most ``rate_per_s``; ``flex_latency``, ``flex_unavailable``
    (a share) and ``latency`` (at list price): as measured, if known (the larger of each
    and the one assumed is used); ``batch=False``: online only (a batch was cancelled).
    """
    left = deadline.at - now
    rounds = max(1, rounds)
    lat = max(deadline.latency, latency or 0.0)
    send_s = requests / max(rate_per_s, 1e-9)
    list_tail = tail_seconds(requests=requests, rounds=rounds, rate_per_s=rate_per_s, latency=lat)
    flex_s = _flex_seconds(deadline, flex_latency, flex_unavailable)
    flex_until = deadline.at - flex_s - (rounds - 1) * lat
    # Batch: every round done before its cancel begins, and the tail still fits after.
    cutoff = left - list_tail
    if batch and cutoff > 0:
        cancel_lead = min(cutoff * CANCEL_SHARE, CANCEL_MAX_S)
        if rounds * deadline.batch_turnaround <= cutoff - cancel_lead:
            return TierPlan(
                deadline=deadline,
                now=now,
                batch_s=cutoff,
                flex_until=flex_until,
                flex_share=1.0,
                finish_s=rounds * deadline.batch_turnaround,
                meets=True,
            )
    # Online: requests go out evenly at the rate; those sent by flex_until go by Flex.
    # After the first answers: by Flex when all of it can go by Flex, else at list price.
    all_flex_window = flex_until - now - WARMUP_ANSWERS * flex_s
    flex_first = send_s <= all_flex_window
    flex_window = (
        all_flex_window if flex_first else max(0.0, flex_until - now - WARMUP_ANSWERS * lat)
    )
    flex_share = 1.0 if send_s <= flex_window else (flex_window / send_s if send_s else 1.0)
    # All by Flex: the last one sent, then its Flex answer; else the last sent at list price.
    warmup = WARMUP_ANSWERS * (flex_s if flex_first else lat)
    all_flex = warmup + send_s + flex_s + (rounds - 1) * lat
    finish = all_flex if flex_share >= 1.0 else list_tail
    return TierPlan(
        deadline=deadline,
        now=now,
        batch_s=None,
        flex_until=flex_until,
        flex_share=flex_share,
        finish_s=finish,
        meets=finish <= left,
        flex_first=flex_first,
    )


def tail_seconds(*, requests: int, rounds: int, rate_per_s: float, latency: float) -> float:
    """What ``requests`` over ``rounds`` dependent rounds take online at list price, at
    ``rate_per_s`` and ``latency``: the pacing sends its first requests one after another
    (``WARMUP_ANSWERS``) before it sends at the full rate, and the last row's rounds follow
    one another."""
    send_s = requests / max(rate_per_s, 1e-9)
    return WARMUP_ANSWERS * latency + send_s + max(1, rounds) * latency


def rate_of(deadline: Deadline, *, rpm: float | None, max_concurrency: int) -> float:
    """Requests per second the plan assumes: ``rpm``, else what the concurrency allows at
    list-price latency (for ``max_concurrency=None``, "auto", callers pass the cap while
    no rate is known, ``core.config.UNPACED_MAX_CONCURRENCY``)."""
    if rpm:
        return rpm / 60.0
    return max_concurrency / max(deadline.latency, 1e-3)


def _flex_seconds(
    deadline: Deadline, measured: float | None, unavailable: float | None = None
) -> float:
    """What a Flex request is expected to take, retries for unavailability included (the
    larger of what is assumed and what is measured, for each)."""
    latency = max(deadline.flex_latency, measured or 0.0)
    share = min(max(deadline.flex_unavailable, unavailable or 0.0), MAX_UNAVAILABLE)
    return latency / (1.0 - share)


def projected_end(*, now: float, since: float, done: int, total: int, turnaround: float) -> float:
    """When a batch ends, at its pace so far: ``done`` of its ``total`` lines finished
    between ``since`` (when it was last seen before it ran, or first seen) and ``now``.

    Nothing done yet: ``since + turnaround`` (what is assumed) while that is ahead, else
    never (``inf``): it has run longer than assumed without a line to show for it. The
    clock is the caller's (the batch sender's is ``time.monotonic``).
    """
    if total > 0 and done >= total:
        return now
    if done <= 0:
        assumed = since + turnaround
        return assumed if assumed > now else math.inf
    return now + (total - done) * max(now - since, 0.0) / done


def batch_late(
    *,
    now: float,
    since: float,
    done: int,
    total: int,
    turnaround: float,
    rounds_left: int,
    cancel_at: float,
    submitted: float | None = None,
    validating: bool = False,
) -> float | None:
    """When a batch is expected to end, if it and the ``rounds_left - 1`` rounds after it
    cannot end before ``cancel_at``, when its cancel would begin anyway (the module
    docstring); ``None`` when they can.

    This batch ends at ``projected_end``; each later round takes at least the
    ``turnaround`` assumed, and at least as long as this one from its ``submitted``
    (default ``since``) to its end: a later round validates as this one did. A batch
    still ``validating`` ends, at best, the ``turnaround`` assumed from ``now``.
    """
    if validating:
        end = now + turnaround
        began = now
    else:
        end = projected_end(now=now, since=since, done=done, total=total, turnaround=turnaround)
        began = since if submitted is None else min(submitted, since)
    later = max(turnaround, end - began) * max(0, rounds_left - 1)
    return end if end + later > cancel_at else None


class TierChooser:
    """One job's choice of tier for each online request, in one process (owned by ``Job``).

    A request goes by Flex while its answer, at the Flex latency and unavailability
    assumed or measured here (the larger of each), plus its row's later rounds at list
    price (at the list-price latency assumed or measured, the larger), is back by the
    deadline; after that at list price. Until its first answers are back here
    (``WARMUP_ANSWERS``), the pacing sends one request after another: by Flex that wait
    is Flex's latency, which only a plan with room for all of it by Flex can afford; any
    other plan asks those first requests at list price.

    The unavailable share measured is ``(unavailable + UNAVAILABLE_PRIOR x assumed) /
    (Flex requests answered + UNAVAILABLE_PRIOR)``: one or two "resource unavailable"
    among the first answers are not taken for all of them.

    The online rate measured is the provider's limit as its answers' headers announce
    it: ``rpm / 60``, or ``tpm / 60`` over the tokens an answer has used on average, the
    lower (the pacing sends at it: ``limits.pacer``). A plan, and the batch cut-off
    (``cutoff_at``), use the lower of it and the rate told or assumed.
    """

    def __init__(self, deadline: Deadline, *, rounds: int) -> None:
        self.deadline = deadline
        self.rounds = max(1, rounds)
        self._lock = threading.Lock()
        self._flex_seconds = 0.0
        self._flex_answers = 0
        self._flex_unavailable = 0  # Flex requests answered "resource unavailable"
        self._list_seconds = 0.0
        self._list_answers = 0  # answers at list price: their latency
        self._tokens = 0.0  # tokens the answers used (prompt and output), all tiers
        self._answered = 0  # answers back here: WARMUP_ANSWERS, and the pacing has warmed up
        self._rpm: float | None = None  # the limits the freshest headers announced
        self._tpm: float | None = None
        self._flex_first = True  # the last plan has room for a warm-up by Flex
        self._rate_per_s = 0.0  # the rate the last plan assumed (a re-plan assumes it too)
        self._job_requests = 0  # the job's requests, as its partitions planned them

    def tier(self, now: float | None = None) -> Tier:
        now = time.time() if now is None else now
        with self._lock:
            if self._answered < WARMUP_ANSWERS and not self._flex_first:
                return "default"
            measured, unavailable = self._measured()
            latency = self._latency()
        flex_s = _flex_seconds(self.deadline, measured, unavailable)
        latest = self.deadline.at - flex_s - (self.rounds - 1) * latency
        return "flex" if now <= latest else "default"

    def observe(
        self,
        seconds: float,
        *,
        flex: bool,
        unavailable: bool = False,
        tokens: int = 0,
    ) -> None:
        """An answer (``flex``: by Flex) took ``seconds``, from its tier's choice to its
        answer (its wait for a paced start included: a row's next round waits so too);
        ``unavailable``: it was Flex's "resource unavailable" (no answer: retried).
        ``tokens``: those it used (prompt and output)."""
        with self._lock:
            if unavailable:
                self._flex_unavailable += 1
                return
            self._answered += 1
            self._tokens += max(0, tokens)
            if flex:
                self._flex_seconds += seconds
                self._flex_answers += 1
            else:
                self._list_seconds += seconds
                self._list_answers += 1

    def announced(self, *, rpm: float | None, tpm: float | None) -> None:
        """An answer's headers (any answer's, a 429's too) announce these limits per
        minute (None: not said): the freshest are kept."""
        if rpm or tpm:
            with self._lock:
                self._rpm = rpm or self._rpm
                self._tpm = tpm or self._tpm

    def flex_measured(self) -> tuple[float | None, float | None]:
        """Flex's mean latency and unavailable share measured here (None: nothing yet)."""
        with self._lock:
            return self._measured()

    def online_measured(self) -> tuple[float | None, float | None]:
        """The online rate (requests/s, as the provider's headers announce its limit) and
        the mean list-price latency (seconds) measured here (None: nothing yet)."""
        with self._lock:
            return self._announced_rate(), (
                self._list_seconds / self._list_answers if self._list_answers else None
            )

    def _measured(self) -> tuple[float | None, float | None]:
        latency = self._flex_seconds / self._flex_answers if self._flex_answers else None
        asked = self._flex_answers + self._flex_unavailable
        prior = UNAVAILABLE_PRIOR * self.deadline.flex_unavailable
        share = (self._flex_unavailable + prior) / (asked + UNAVAILABLE_PRIOR) if asked else None
        return latency, share

    def _latency(self) -> float:
        """The list-price latency to plan with: the larger of the one assumed and measured."""
        measured = self._list_seconds / self._list_answers if self._list_answers else 0.0
        return max(self.deadline.latency, measured)

    def _announced_rate(self) -> float | None:
        rates = []
        if self._rpm:
            rates.append(self._rpm / 60.0)
        if self._tpm and self._answered and self._tokens > 0:
            rates.append(self._tpm / 60.0 / (self._tokens / self._answered))
        return min(rates) if rates else None

    def _rate(self, assumed: float) -> float:
        """The rate to plan with: the lower of ``assumed`` and the one announced."""
        announced = self._announced_rate()
        return assumed if announced is None else min(assumed, announced)

    def plan(
        self, *, now: float, requests: int, rate_per_s: float | None = None, batch: bool = True
    ) -> TierPlan:
        """The plan for ``requests`` from ``now`` with what is measured here so far;
        ``rate_per_s``: the rate told or assumed (None for the last plan's; the lower of it
        and the one measured is used); ``batch=False``: online only (a re-plan after a
        batch was cancelled)."""
        with self._lock:
            if rate_per_s is None:
                rate_per_s = self._rate_per_s
            self._rate_per_s = rate_per_s
            if batch:
                self._job_requests = requests
            measured, unavailable = self._measured()
            rate = self._rate(rate_per_s)
            latency = self._latency()
        plan = plan_tiers(
            self.deadline,
            now=now,
            requests=requests,
            rounds=self.rounds,
            rate_per_s=rate,
            flex_latency=measured,
            flex_unavailable=unavailable,
            latency=latency,
            batch=batch,
        )
        with self._lock:
            self._flex_first = plan.batch_s is not None or plan.flex_first
        return plan

    def cutoff_at(self) -> float | None:
        """The batch cut-off (epoch seconds) with the rate and the list-price latency known
        now (each the worse of the one assumed and the one measured): ``deadline - tail``
        for the job's requests (None: no partition has planned yet)."""
        with self._lock:
            if not self._job_requests or not self._rate_per_s:
                return None
            tail = tail_seconds(
                requests=self._job_requests,
                rounds=self.rounds,
                rate_per_s=self._rate(self._rate_per_s),
                latency=self._latency(),
            )
        return self.deadline.at - tail


__all__ = [
    "Deadline",
    "TierChooser",
    "TierPlan",
    "batch_late",
    "plan_tiers",
    "projected_end",
    "rate_of",
    "tail_seconds",
]
