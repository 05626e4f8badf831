//! An empty tc program (`r0 = 0; exit`), loaded with raw `bpf(2)` calls (aya loads only
//! objects): run through `BPF_PROG_TEST_RUN` it shows what the harness costs by itself (skb
//! setup, the per-run loop), and with run-time statistics on what the statistics add to a
//! run (one `sched_clock()` read inside the measured interval). Both are subtracted from the
//! datapath's numbers to get the programs' own cost.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// `union bpf_attr` is larger; the kernel accepts a shorter one whose tail it treats as zero.
const ATTR_LEN: usize = 128;
/// Offsets in `struct bpf_prog_info` (uapi `linux/bpf.h`).
const INFO_RUN_TIME_NS: usize = 192;
const INFO_RUN_CNT: usize = 200;
const INFO_LEN: usize = 232;

fn put<const N: usize>(attr: &mut [u8], offset: usize, bytes: [u8; N]) {
    attr[offset..offset + N].copy_from_slice(&bytes);
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; ATTR_LEN]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable `union bpf_attr` prefix of ATTR_LEN bytes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), ATTR_LEN as u32) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

pub struct EmptyProgram(OwnedFd);

impl EmptyProgram {
    pub fn load() -> Self {
        // mov64 r0, 0 (TC_ACT_OK); exit
        let insns: [u8; 16] = [0xb7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
        let license = b"GPL\0";
        let mut attr = [0u8; ATTR_LEN];
        put(&mut attr, 0, BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
        put(&mut attr, 4, 2u32.to_ne_bytes());
        put(&mut attr, 8, (insns.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 16, (license.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 48, *b"mb_perf_empty\0\0\0");
        let fd = bpf(BPF_PROG_LOAD, &mut attr).expect("BPF_PROG_LOAD of the empty program");
        // SAFETY: the kernel returned a new program fd that nothing else owns.
        Self(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Kernel-measured average ns per run over `repeat` runs on `frame`.
    pub fn test_run_ns(&self, frame: &[u8], repeat: u32) -> f64 {
        let mut out = vec![0u8; frame.len() + 256];
        let mut attr = [0u8; ATTR_LEN];
        put(&mut attr, 0, (self.0.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 8, (frame.len() as u32).to_ne_bytes());
        put(&mut attr, 12, (out.len() as u32).to_ne_bytes());
        put(&mut attr, 16, (frame.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 24, (out.as_mut_ptr() as u64).to_ne_bytes());
        put(&mut attr, 32, repeat.to_ne_bytes());
        bpf(BPF_PROG_TEST_RUN, &mut attr).expect("BPF_PROG_TEST_RUN of the empty program");
        f64::from(u32::from_ne_bytes(
            attr[36..40].try_into().expect("4 bytes"),
        ))
    }

    /// (run_time_ns, run_cnt) as the kernel counts them.
    pub fn stats(&self) -> (u64, u64) {
        let mut info = [0u8; INFO_LEN];
        let mut attr = [0u8; ATTR_LEN];
        put(&mut attr, 0, (self.0.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 4, (INFO_LEN as u32).to_ne_bytes());
        put(&mut attr, 8, (info.as_mut_ptr() as u64).to_ne_bytes());
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).expect("BPF_OBJ_GET_INFO_BY_FD");
        let u64_at = |o: usize| u64::from_ne_bytes(info[o..o + 8].try_into().expect("8 bytes"));
        (u64_at(INFO_RUN_TIME_NS), u64_at(INFO_RUN_CNT))
    }

    /// ns per run as the run-time statistics see it, over `repeat` runs (statistics must be
    /// on).
    pub fn stats_ns(&self, frame: &[u8], repeat: u32) -> f64 {
        let (t0, c0) = self.stats();
        self.test_run_ns(frame, repeat);
        let (t1, c1) = self.stats();
        assert!(c1 > c0, "run-time statistics counted no run");
        (t1 - t0) as f64 / (c1 - c0) as f64
    }
}
