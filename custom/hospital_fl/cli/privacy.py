"""`hospital-fl privacy init|report`: a site's privacy policy and ledger."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_privacy_commands"]


def _cmd_privacy_init(args) -> int:
    from hospital_fl.privacy.policy import SitePrivacyPolicy
    from hospital_fl.privacy.setup import init_site_privacy

    policy = None
    if args.require_dp or args.job_epsilon or args.lifetime_epsilon:
        from hospital_fl.privacy.policy import policy_from_dict

        policy = policy_from_dict(
            {
                "require_dp": args.require_dp,
                "max_job_epsilon": args.job_epsilon,
                "lifetime_epsilon": args.lifetime_epsilon,
                "delta": args.delta,
            },
            "command line",
        )
    if policy is None and args.delta != SitePrivacyPolicy().delta:
        policy = SitePrivacyPolicy(delta=args.delta)
    # flags only set a new site's policy; init never rewrites an existing one (nor loosens it)
    ledger = init_site_privacy(args.site_home, args.site, policy, rebuild=args.rebuild)
    print(ledger.path)
    return 0


def _cmd_privacy_report(args) -> int:
    from hospital_fl.privacy.ledger import PrivacyLedger
    from hospital_fl.privacy.policy import SitePrivacyPolicy, read_site_policy

    home = Path(args.site_home)
    policy = read_site_policy(home / "local") or SitePrivacyPolicy()
    ledger = PrivacyLedger(policy.ledger_path(home))
    summary = ledger.summary(policy.delta, policy.accountant)
    summary["differences_from_audit_trail"] = ledger.audit_problems()  # empty when they agree
    summary["lifetime_budget"] = policy.lifetime_epsilon
    summary["max_job_epsilon"] = policy.max_job_epsilon
    print(json.dumps(summary, indent=2))
    return 0


def add_privacy_commands(sub: argparse._SubParsersAction) -> None:
    privacy = sub.add_parser("privacy", help="a site's privacy policy and ledger")
    psub = privacy.add_subparsers(dest="privacy_command", required=True)
    init = psub.add_parser("init", help="create a site's ledger (and policy file) in its workspace or kit")
    init.add_argument("site_home", help="the site's workspace / startup kit root (holds local/)")
    init.add_argument("--site", required=True, help="the site name, e.g. site-1")
    init.add_argument("--require-dp", action="store_true", help="refuse jobs without DP at this site")
    init.add_argument("--job-epsilon", type=float, default=None, help="most epsilon one job may spend")
    init.add_argument("--lifetime-epsilon", type=float, default=None, help="most epsilon all jobs may spend")
    init.add_argument("--delta", type=float, default=1e-5, help="delta of the budgets (default 1e-5)")
    init.add_argument(
        "--rebuild",
        action="store_true",
        help="write the ledger again from the site's verified audit trail (a missing, damaged or version-1 ledger)",
    )
    init.set_defaults(func=_cmd_privacy_init, command="privacy init")
    report = psub.add_parser("report", help="epsilon spent per job and in total, from the site's ledger")
    report.add_argument("site_home")
    report.set_defaults(func=_cmd_privacy_report, command="privacy report")
