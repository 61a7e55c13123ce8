"""The audit's verdict: violations, the evidence behind them, as JSON and as a few lines for a person."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .findings import Findings, read_mounts, storage_of


@dataclass
class ProbeSummary:
    """What the audit asked of the stack: it proves something only if the requests really went through."""

    model: str = ""
    sent: int = 0
    answered: int = 0
    refused: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "sent": self.sent, "answered": self.answered, "refused_as_expected": self.refused}


@dataclass
class Report:
    mode: str
    netns: bool
    interfaces: list[str]
    probe: ProbeSummary
    findings: Findings
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
        return self

    @property
    def passed(self) -> bool:
        return not self.violations

    def as_json(self) -> dict[str, Any]:
        mounts = read_mounts()
        findings = self.findings
        return {
            "passed": self.passed,
            "violations": self.violations,
            "mode": self.mode,
            "netns": self.netns,
            "interfaces": self.interfaces,
            "requests": self.probe.as_json(),
            "canaries": sorted(findings.canaries.needles),
            "traced": {"processes_and_threads": len(findings.pids), "calls": findings.calls},
            "egress": [destination.as_json() for destination in findings.egress.values()],
            "dns": [destination.as_json() for destination in findings.dns.values()],
            "files_written": [written.as_json(storage_of(written.path, mounts))
                              for written in sorted(findings.files.values(), key=lambda w: w.path)],
            "log_streams": [{"program": stream.program, "stream": "stdout" if stream.fd == 1 else "stderr",
                             "writes": stream.writes, "canaries": sorted(stream.canaries)}
                            for stream in findings.logs.values()],
        }

    def summary(self) -> str:
        findings, probe = self.findings, self.probe
        lines = [
            f"airlock audit: {'PASSED' if self.passed else 'FAILED'}"
            f" ({self.mode} stack{', loopback-only network namespace' if self.netns else ''})",
            f"  requests: {probe.sent} sent with canaries to {probe.model}, {probe.answered} answered, "
            f"{probe.refused} refused as expected",
            f"  traced: {findings.calls} calls from {len(findings.pids)} processes and threads",
            f"  egress attempts: {sum(d.calls for d in findings.egress.values())}, "
            f"DNS lookups: {sum(d.calls for d in findings.dns.values())}",
            f"  files written: {len(findings.files)} "
            f"({sum(1 for w in findings.files.values() if w.canaries)} with a canary), "
            f"log writes: {sum(s.writes for s in findings.logs.values())} "
            f"({sum(1 for s in findings.logs.values() if s.canaries)} streams with a canary)",
        ]
        lines += [f"  VIOLATION {violation}" for violation in self.violations]
        return "\n".join(lines)
