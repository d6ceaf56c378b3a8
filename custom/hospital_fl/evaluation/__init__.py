"""Per-site evaluation, baselines, bootstrap CIs, report and plots."""
