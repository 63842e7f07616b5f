"""The Ray Tune adapter: a sweep's search space, trials that run the trial body they are given, the ranked result."""
