"""Running a consortium: what its server, hospitals and jobs are doing, as plain data and pages."""
