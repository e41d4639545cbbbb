"""hybridlab.jobs — what runs on the cluster: training loop, data, evals, recipes."""
