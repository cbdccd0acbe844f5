"""A test learner whose policy has moved, against every token it trains on, by SLOPE nats per version of
lag: after each step it reports its proximal log-probs raised by SLOPE × lag on every response token.
The staleness S the controller sees is then a known, smooth function of the lag, so a closed loop on
real actors (real admission, real lag) has a plant whose every step of lead costs the same: k3 of a
constant log-ratio x is e^x − 1 − x (for SLOPE 0.07: 0.0025 nats at lag 1, 0.0103 at lag 2, 0.0237 at
lag 3). With a learning rate of ~0 the policy's own divergence adds nothing. Named in a config as
`learner.backend: tests.lag_learner:LagLearner`."""

from __future__ import annotations

import os

from flux.learner.torch_learner import TorchLearner

SLOPE = float(os.environ.get("FLUX_TEST_LAG_SLOPE", "0.07"))


class LagLearner(TorchLearner):
    def step(self, loss_fn, batch, micro_batches=None, fill_proximal=False):
        trained_at = self.step_count  # the version this step trains at (the actor's `trained_at`)
        stats = super().step(loss_fn, batch, micro_batches, fill_proximal)
        lag = (trained_at - batch.versions).clamp(min=0) * batch.response_mask
        batch.proximal_logprobs = batch.proximal_logprobs + SLOPE * lag.to(batch.proximal_logprobs)
        return stats
