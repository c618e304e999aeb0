"""The decoder step as the decoding loops run it on onnxruntime: state kept in bound buffers.

A step through `session.run` converts its feeds, allocates its outputs and builds dicts: about as
long as the step's own arithmetic at batch 1 (docs/runtime.md has the figures). The two classes
here bind the step's inputs and outputs instead. Each object belongs to one decoding call (or, for
`BufferedStep`, one thread) and is never shared between calls running at the same time: that is
what makes one `Captioner` safe to call from many threads.
"""

from __future__ import annotations

import numpy as np

from .bundle import IMAGE_STATE, STATE_FROM_STEP

# Outputs fed back as the next step's inputs.
CARRIED = STATE_FROM_STEP  # h_next -> h, c_next -> c


class BufferedStep:
    """The decoder step on the CPU with every input and output bound once, to buffers made once.

    Two IO bindings alternate: call t reads the state from buffer t % 2 and writes the next state
    into the other, so nothing moves and nothing is allocated per step. `tokens` is the token input
    itself: the greedy loop writes the next tokens into it (np.argmax(..., out=tokens)) and calls
    the step, which returns the logits buffer (overwritten by the next call).

    Args:
        session: the decoder step's InferenceSession.
        batch: rows; fixed for the life of the buffers.
        specs: per-row shape and dtype of each input and output by name (the manifest's graphs).
    """

    def __init__(self, session, batch: int, specs: dict[str, tuple[tuple[int, ...], np.dtype]]):
        import onnxruntime as ort

        self.session, self.batch = session, batch
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]

        def buffer(name):
            shape, dtype = specs[name]
            return np.zeros((batch, *shape), dtype=dtype)

        self.tokens = buffer("token")
        self._state = {name: (buffer(name), buffer(name)) for name in inputs if name in CARRIED.values()}
        self._shared = {"token": self.tokens}
        for name in inputs:
            if name in IMAGE_STATE:  # the same at every step: one buffer for both bindings
                self._shared[name] = buffer(name)
        self._out = {name: buffer(name) for name in outputs if name not in CARRIED}
        self._bindings = []
        for parity in (0, 1):
            b = session.io_binding()
            for name in inputs:
                array = self._shared[name] if name in self._shared else self._state[name][parity]
                b.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
            for name in outputs:
                array = self._state[CARRIED[name]][1 - parity] if name in CARRIED else self._out[name]
                b.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))
            self._bindings.append(b)
        self._parity = 0
        self._run = session.run_with_iobinding  # looked up once: the step is ~30 µs at batch 1

    def load(self, state: dict[str, np.ndarray]) -> "BufferedStep":
        """Start from this state (h, plus c and features or the attention cache where the graph takes
        them; other entries are ignored), batch rows as made."""
        self._parity = 0
        for name, value in state.items():
            if name in self._shared and name != "token":
                np.copyto(self._shared[name], value)
            elif name in self._state:
                np.copyto(self._state[name][0], value)
        return self

    def __call__(self) -> np.ndarray:
        """One step on `tokens` and the current state; the logits (batch, V), overwritten by the next call."""
        # No RunOptions: onnxruntime's wrapper looks a run option up through an exception when one is
        # given without a graph id (~60 µs measured, twice the step itself).
        self._run(self._bindings[self._parity])
        self._parity ^= 1
        return self._out["logits"]

    def state(self) -> dict[str, np.ndarray]:
        """The current state (copies): what the next call reads."""
        current = {name: pair[self._parity].copy() for name, pair in self._state.items()}
        current.update({name: array.copy() for name, array in self._shared.items() if name in IMAGE_STATE})
        return current


class DeviceStep:
    """The decoder step through IO binding with the state left where the provider put it (CUDA).

    A function from feeds to outputs, like `Captioner.step`: feeds may be numpy arrays (copied to the
    device once per call of the decoding loop: an array seen again, such as the attention features,
    reuses its copy) or the OrtValues a previous call returned (used in place). Each call sends the
    tokens and brings back only the logits; h_next, c_next and attn_weights stay on the device as
    OrtValues, ready to be fed back. Make one per decoding call. On the CPU provider the same code
    runs with device memory being host memory, which is how the tests exercise it.
    """

    def __init__(self, session, device: str, device_id: int = 0):
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        self.device, self.device_id = device, device_id
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = [o.name for o in session.get_outputs()]
        self._binding = session.io_binding()
        self._uploaded: dict[str, tuple[np.ndarray, object]] = {}

    def _on_device(self, name: str, value):
        if isinstance(value, self._ort.OrtValue):
            return value
        seen = self._uploaded.get(name)
        if seen is not None and seen[0] is value:  # holding the array keeps its identity unique
            return seen[1]
        ortvalue = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, self.device_id)
        self._uploaded[name] = (value, ortvalue)
        return ortvalue

    def __call__(self, feeds: dict) -> dict:
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name in self.inputs:
            b.bind_ortvalue_input(name, self._on_device(name, feeds[name]))
        for name in self.outputs:
            # Fresh output buffers each step: this step's h_next must not overwrite the h it reads.
            b.bind_output(name, "cpu" if name == "logits" else self.device, self.device_id)
        self.session.run_with_iobinding(b)
        out = dict(zip(self.outputs, b.get_outputs()))
        out["logits"] = out["logits"].numpy()  # (N, V) on the host: the tokens are chosen here
        return out
