"""Which trials a worker process may run one after another."""

from __future__ import annotations


def test_which_trials_a_worker_runs_after_another():
    from bakeoff.job import TrialJob
    from bakeoff.trial import reusable_after

    def job(framework="pytorch", device="cpu", top=False):
        return TrialJob(spec={"framework": framework}, protocol={"train_only_top_layer": top}, cache_path="",
                        input_size=8, labels=None, train_idx=None, val_idx=None, classes=[], out_dir="",
                        device=device)

    assert reusable_after(job()) and reusable_after(job(device="cuda:0", top=True))
    assert not reusable_after(job(device="cuda:0")) and not reusable_after(job("tensorflow"))
