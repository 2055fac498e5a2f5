"""Job leases (which worker runs a job) and the reaper's re-enqueue claims."""

from __future__ import annotations

from app_common.store._common import StoreBase

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class LeaseOps(StoreBase):
    def acquire_lease(self, job_id: str, token: str, ttl_s: float) -> bool:
        """Take the job's lease unless another live token holds it."""
        return bool(self.redis.set(self.names.lease(job_id), token, nx=True, px=_ms(ttl_s)))

    def renew_lease(self, job_id: str, token: str, ttl_s: float) -> bool:
        """Extend the lease if ``token`` still holds it; False means it was lost."""
        return bool(self._script(_RENEW)(keys=[self.names.lease(job_id)], args=[token, _ms(ttl_s)]))

    def release_lease(self, job_id: str, token: str) -> None:
        self._script(_RELEASE)(keys=[self.names.lease(job_id)], args=[token])

    def lease_alive(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.names.lease(job_id)))

    def claim_reap(self, job_id: str, window_s: float) -> bool:
        """True for the first reaper to claim re-enqueueing ``job_id`` within ``window_s``; every
        other claim in the window (another reaper, or this one's next pass) gets False."""
        return bool(self.redis.set(self.names.reaped(job_id), "1", nx=True, px=_ms(window_s)))
