"""The audit's verdict: violations, the evidence behind them, as JSON and as a few lines for a person."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .canary import Canaries
from .capture import CaptureResult, WirePlan
from .findings import Findings, read_mounts, storage_of
from .wire import CaptureFormatError, WireFindings, connections, judge


@dataclass
class ProbeSummary:
    """What the audit asked of the stack: it proves something only if the requests really went through."""

    model: str = ""
    sent: int = 0
    answered: int = 0
    refused: int = 0
    # The questions carried the canary PDF (documents on in the stack's settings, or not known).
    documents: bool = True
    # The last unexpected refusal's status, code and message (the gateway's own words), for the operator.
    error: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "sent": self.sent, "answered": self.answered, "refused_as_expected": self.refused,
                "documents": self.documents}


@dataclass
class WireReport:
    """The wire part: what was captured where, what travelled in clear, and whether that proves anything."""

    plan: WirePlan | None = None
    skipped: str = ""
    capture: CaptureResult | None = None
    findings: WireFindings | None = None
    problems: list[str] = field(default_factory=list)

    @classmethod
    def not_watched(cls, reason: str) -> WireReport:
        return cls(skipped=reason)

    @classmethod
    def of(cls, plan: WirePlan, capture: CaptureResult, canaries: Canaries) -> WireReport:
        """Judge the capture; anything that makes "nothing in clear" unprovable is a problem, never a pass."""
        report = cls(plan, capture=capture)
        report.problems += list(plan.unwatched)
        try:
            report.findings = judge(connections(capture.pcap, plan.ports), canaries)
        except CaptureFormatError as exc:
            report.problems.append(f"the capture could not be read: {exc}")
            return report
        if capture.truncated:
            report.problems.append(f"the capture outgrew --wire-max-mb ({plan.max_bytes // (1024 * 1024)} MB)")
        if capture.dropped_packets is None:
            report.problems.append("tcpdump did not say how many packets it dropped")
        elif capture.dropped_packets:
            report.problems.append(f"the kernel dropped {capture.dropped_packets} packets before tcpdump read them")
        for hop in sorted(set(plan.ports.values())):
            if not report.findings.per_hop.get(hop):
                report.problems.append(f"no connection to the {hop} was captured on {plan.interface} "
                                       "(another interface? see --wire-interface)")
        return report

    @property
    def verified(self) -> bool:
        return self.findings is not None and not self.problems

    def violations(self) -> list[str]:
        return [leak.violation() for leak in self.findings.leaks] if self.findings else []

    def as_json(self) -> dict[str, Any]:
        if self.plan is None:
            return {"watched": False, "verified": False, "reason": self.skipped}
        document: dict[str, Any] = {"watched": True, "verified": self.verified, "problems": self.problems,
                                    **self.plan.as_json()}
        if self.capture is not None:
            document.update(packets=self.capture.captured_packets, dropped_by_kernel=self.capture.dropped_packets,
                            pcap_bytes=len(self.capture.pcap))
        if self.findings is not None:
            document.update(self.findings.as_json())
        return document

    def summary(self) -> list[str]:
        if self.plan is None:
            return [f"  wire: NOT watched ({self.skipped})"]
        lines = []
        if self.findings is not None:
            wire = self.findings.as_json()
            lines.append(f"  wire: {wire['flows']} flows, {wire['bytes']} bytes captured on {self.plan.interface}, "
                         f"{wire['in_clear']} in clear ({wire['encrypted']} TLS, "
                         f"{wire['plaintext_without_findings']} plaintext with nothing found, {wire['empty']} empty)")
        lines += [f"  wire: {note}" for note in self.plan.notes]
        lines += [f"  wire NOT verified: {problem}" for problem in self.problems]
        return lines


@dataclass
class Report:
    mode: str
    netns: bool
    interfaces: list[str]
    probe: ProbeSummary
    findings: Findings
    wire: WireReport = field(default_factory=lambda: WireReport.not_watched("not asked"))
    violations: list[str] = field(default_factory=list)

    def judge(self) -> Report:
        findings = self.findings
        for destination in findings.egress.values():
            self.violations.append(
                f"egress: {', '.join(sorted(destination.programs))} tried {destination.address} port "
                f"{destination.port} ({destination.calls}x)")
        for destination in findings.dns.values():
            self.violations.append(
                f"dns: {', '.join(sorted(destination.programs))} looked a name up via {destination.address}"
                + (f" port {destination.port}" if destination.port else ""))
        for written in findings.files.values():
            if written.canaries:
                self.violations.append(f"file: {written.path} holds {', '.join(sorted(written.canaries))}")
        for stream in findings.logs.values():
            if stream.canaries:
                name = "stdout" if stream.fd == 1 else "stderr"
                self.violations.append(
                    f"log: {stream.program} wrote {', '.join(sorted(stream.canaries))} to {name}")
        self.violations += self.wire.violations()
        return self

    @property
    def passed(self) -> bool:
        return self.verdict == "PASSED"

    @property
    def verdict(self) -> str:
        """FAILED on any violation; otherwise PASSED only if every part that was asked for could be verified."""
        if self.violations:
            return "FAILED"
        return "PASSED" if self.wire.verified or self.wire.plan is None else "NOT VERIFIED"

    def as_json(self) -> dict[str, Any]:
        mounts = read_mounts()
        findings = self.findings
        return {
            "passed": self.passed,
            "verdict": self.verdict,
            "violations": self.violations,
            "mode": self.mode,
            "netns": self.netns,
            "interfaces": self.interfaces,
            "requests": self.probe.as_json(),
            "canaries": sorted(findings.canaries.needles),
            "traced": {"processes_and_threads": len(findings.pids), "calls": findings.calls,
                       "programs": [name for name in findings.programs if name != "?"]},
            "egress": [destination.as_json() for destination in findings.egress.values()],
            "dns": [destination.as_json() for destination in findings.dns.values()],
            "files_written": [written.as_json(storage_of(written.path, mounts))
                              for written in sorted(findings.files.values(), key=lambda w: w.path)],
            "log_streams": [{"program": stream.program, "stream": "stdout" if stream.fd == 1 else "stderr",
                             "writes": stream.writes, "canaries": sorted(stream.canaries)}
                            for stream in findings.logs.values()],
            "wire": self.wire.as_json(),
        }

    def summary(self) -> str:
        findings, probe = self.findings, self.probe
        lines = [
            f"airlock audit: {self.verdict}"
            f" ({self.mode} stack{', loopback-only network namespace' if self.netns else ''})",
            f"  requests: {probe.sent} sent with canaries to {probe.model}, {probe.answered} answered, "
            f"{probe.refused} refused as expected"
            + ("" if probe.documents else " (no PDF: documents.enabled is false)"),
            f"  traced: {findings.calls} calls from {len(findings.pids)} processes and threads",
            f"  egress attempts: {sum(d.calls for d in findings.egress.values())}, "
            f"DNS lookups: {sum(d.calls for d in findings.dns.values())}",
            f"  files written: {len(findings.files)} "
            f"({sum(1 for w in findings.files.values() if w.canaries)} with a canary), "
            f"log writes: {sum(s.writes for s in findings.logs.values())} "
            f"({sum(1 for s in findings.logs.values() if s.canaries)} streams with a canary)",
        ]
        lines += self.wire.summary()
        lines += [f"  VIOLATION {violation}" for violation in self.violations]
        return "\n".join(lines)
