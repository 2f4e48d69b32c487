"""Reading results: the pipeline grid (config -> jobs), summary, intervals, spike diagnosis, report and figures."""
