"""Training checkpoints written in the background (`TrainCheckpointer(async_save=True)`, the
trainer's default via `async_checkpointing`).

The train step donates the state's buffers: the next step reuses them in place. An async save
must therefore copy the state before `save` returns; the test donates and overwrites the state
right after `save` (with jax 0.10 XLA:CPU deletes the donated arrays and reuses their memory)
and checks that the checkpoint holds the values of the save, not the update's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zephyr_jax.train_checkpoint import TrainCheckpointer
from zephyr_jax.train_step import TrainState


def _state(step: int, value: float) -> TrainState:
    params = {"w": jnp.full((256, 128), value), "b": jnp.full((128,), value)}
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                      opt_state={"mu": jax.tree.map(lambda x: x * 2, params)})


@pytest.mark.parametrize("async_save", [True, False])
def test_a_save_holds_the_state_it_was_given_while_the_next_step_donates_it(tmp_path, async_save):
    ckpt = TrainCheckpointer(str(tmp_path), async_save=async_save)
    state = _state(3, 1.0)
    ckpt.save(state, {"step": 3})

    @jax.jit
    def bump(s):
        return jax.tree.map(lambda x: x + 1, s)

    donating = jax.jit(bump, donate_argnums=0)
    new = jax.block_until_ready(donating(state))
    # jax 0.10 deletes the donated buffers here (the update reuses them); jax 0.11 keeps them
    # while something else still references them and copies instead: either way the checkpoint
    # must hold the values of the save
    print({"donated": state.params["w"].is_deleted()})
    assert float(new.params["w"][0, 0]) == 2.0
    ckpt.wait()
    assert ckpt.latest_step() == 3
    restored, meta = ckpt.restore(jax.eval_shape(lambda: _state(0, 0.0)))
    assert meta == {"step": 3}
    want = _state(3, 1.0)
    for got, ref in zip(jax.tree.leaves(restored), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    ckpt.close()
    ckpt.close()  # a second close does nothing


def test_close_waits_for_a_save_in_flight(tmp_path):
    ckpt = TrainCheckpointer(str(tmp_path), async_save=True)
    ckpt.save(_state(5, 4.0), {"step": 5})
    ckpt.close()
    again = TrainCheckpointer(str(tmp_path))
    assert again.latest_step() == 5
    restored, _ = again.restore(jax.eval_shape(lambda: _state(0, 0.0)))
    assert float(restored.opt_state["mu"]["b"][0]) == 8.0
    again.close()
