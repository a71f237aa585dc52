"""The tile summaries of attention masks (our ccv patch 0013), kept per mask.

A masked MFA call reads a summary of its mask per kernel tile: which tiles attend no key
(skipped: no load, no multiply-accumulate), which attend every key with 0 added (no mask
read), and each block's range of tiles. The bridge writes a summary on the device, before
the attention kernels of the same call and without a host sync, when the call is handed
``summarize``; later calls with the same mask unchanged reuse it: the layers of a step,
which transformers hands one mask tensor, and their backward.

Reuse can never see a stale summary of a mask PyTorch tracks: a summary is reused only
while the mask's storage is the very one it was written from (memory freed and reused by
another tensor is another storage) and the mask's version counter, shared by the tensor
and all its views and bumped by every in-place write, is unchanged. Writes PyTorch itself
does not track (through ``.data``, or through memory shared outside PyTorch) are not seen.
"""

import threading

from torch.multiprocessing.reductions import StorageWeakRef

# Summaries kept at most (masks x call shapes x passes); the oldest go first.
MAX_ENTRIES = 64


class MaskTiles:
    """Summaries by mask. Under ``lock``, from ``get`` until ``written`` (or the failure of
    the call): a call told to reuse a summary must be encoded after the one writing it."""

    def __init__(self):
        self._entries = {}  # key -> [StorageWeakRef of the mask's storage, its version when written, tensors]
        self.lock = threading.Lock()

    @staticmethod
    def _key(mask, shape_key):
        storage = mask.untyped_storage()
        return (storage.data_ptr(), mask.storage_offset(), tuple(mask.shape), tuple(mask.stride()), mask.dtype, shape_key), storage

    def get(self, mask, shape_key, make):
        """-> (the summaries of ``mask``, the very tensor the kernel reads, for a call keyed
        by ``shape_key``: the pass and the call's shapes, which size them; True if this call
        must write them). ``make()`` allocates them when none are kept."""
        key, storage = self._key(mask, shape_key)
        found = self._entries.get(key)
        if found is not None:
            ref, version, tensors = found
            fresh = version == mask._version and ref is not None and not ref.expired() and ref.cdata == storage._cdata
            return tensors, not fresh  # else rewritten in place: the stream orders it after earlier reads
        for stale in [k for k, (ref, _, _) in self._entries.items() if ref is None or ref.expired()]:
            del self._entries[stale]
        while len(self._entries) >= MAX_ENTRIES:
            del self._entries[next(iter(self._entries))]
        tensors = make()
        self._entries[key] = [None, None, tensors]  # not written yet
        return tensors, True

    def written(self, mask, shape_key):
        """The call that was told to write the summaries of ``mask`` has encoded it."""
        key, storage = self._key(mask, shape_key)
        self._entries[key][:2] = StorageWeakRef(storage), mask._version

    def __len__(self):
        return len(self._entries)
