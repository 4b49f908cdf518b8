//! The bpf(2) commands aya 0.14 does not offer: BPF_OBJ_GET of any pinned object
//! (users in `datapath` and `maps`),
//! BPF_LINK_UPDATE (users in `datapath`), and BPF_MAP_UPDATE_BATCH and
//! BPF_MAP_LOOKUP_BATCH, which write or read many entries of one map in one call: a
//! first sync of 10,000 Services is 220,000 entries, and a syscall each (two to read:
//! next key, then value) was most of the time of writing them and of a full resync's
//! read-back.
use std::os::fd::{AsRawFd, BorrowedFd};

/// The bpf(2) syscall with command `cmd` on `attr` (a prefix of `union bpf_attr`).
///
/// # Safety
/// `attr` must be the layout the kernel expects for `cmd`, without implicit padding,
/// and every pointer in it valid for the call. The kernel may write fields of `attr`
/// back (hence `&mut`).
pub(crate) unsafe fn bpf<T>(
    cmd: nix::libc::c_long,
    attr: &mut T,
) -> std::io::Result<nix::libc::c_long> {
    // SAFETY: upheld by the caller.
    let ret = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret)
}

/// Why a batch stopped: how many of its entries were written, and the error of the
/// next one.
#[derive(Debug)]
pub struct BatchError {
    pub written: usize,
    pub error: std::io::Error,
}

/// The `batch` member of `union bpf_attr` (no implicit padding: 8-byte fields, two
/// u32, 8-byte fields).
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// BPF_MAP_UPDATE_BATCH of `keys[i] -> values[i]` (BPF_ANY) into the map `map`,
/// in order. `K` and `V` must be the map's key and value types (their sizes are the
/// map's key and value sizes: slices of them are the packed arrays the kernel reads).
/// The kernel stops at the first entry it cannot write and says how many it wrote.
pub fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    const BPF_MAP_UPDATE_BATCH: nix::libc::c_long = 26;
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(keys.len()).expect("batch fits in u32"),
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` is the batch member of bpf_attr (no implicit padding: 8-byte
    // fields then two u32 then 8-byte fields); both arrays hold `count` packed
    // elements of the map's key and value sizes and outlive the call.
    match unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) } {
        Ok(_) => Ok(()),
        // The kernel writes back how many entries it wrote.
        Err(error) => Err(BatchError {
            written: attr.count as usize,
            error,
        }),
    }
}

/// Every entry of the hash map `map` (not per-CPU) by BPF_MAP_LOOKUP_BATCH, `chunk`
/// entries per call; `K` and `V` must be the map's key and value types. `None` when
/// the kernel has no batch lookup for this map (read it entry by entry instead).
pub fn lookup_all<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd,
    chunk: usize,
) -> std::io::Result<Option<Vec<(K, V)>>> {
    Ok(lookup_up_to(map, chunk, usize::MAX)?.map(|(entries, _)| entries))
}

/// What a batch read returned: the entries, and whether they are all of the map's.
pub type BatchRead<K, V> = (Vec<(K, V)>, bool);

/// [`lookup_all`], stopping once more than `limit` entries are read.
pub fn lookup_up_to<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd,
    chunk: usize,
    limit: usize,
) -> std::io::Result<Option<BatchRead<K, V>>> {
    const BPF_MAP_LOOKUP_BATCH: nix::libc::c_long = 24;
    let mut entries = Vec::new();
    let mut keys: Vec<K> = Vec::with_capacity(chunk);
    let mut values: Vec<V> = Vec::with_capacity(chunk);
    // The hash map's position token (a bucket index, u32); u64 leaves room.
    let (mut position, mut next_position) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &position as *const u64 as u64
            },
            out_batch: &mut next_position as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).expect("chunk fits in u32"),
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` is the batch member of bpf_attr; the key and value buffers
        // have room for `count` packed elements and the tokens for a u32 each.
        let result = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let done = match result {
            Ok(_) => false,
            // The last call: what it read is in `count`.
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => true,
            Err(e)
                if first
                    && matches!(
                        e.raw_os_error(),
                        Some(nix::libc::EINVAL | nix::libc::ENOTSUP | 524)
                    ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let read = (attr.count as usize).min(chunk);
        // SAFETY: the kernel wrote `read` whole keys and values (plain data).
        unsafe {
            keys.set_len(read);
            values.set_len(read);
        }
        entries.extend(keys.drain(..).zip(values.drain(..)));
        if done {
            return Ok(Some((entries, true)));
        }
        if entries.len() > limit {
            return Ok(Some((entries, false)));
        }
        position = next_position;
        first = false;
    }
}

/// BPF_PROG_TEST_RUN of `program` once on `data` (an skb program's frame), which the
/// program may rewrite in place. Returns the program's return value.
pub fn test_run(program: BorrowedFd, data: &mut [u8]) -> std::io::Result<u32> {
    let size = u32::try_from(data.len()).expect("a frame fits in u32");
    let pointer = data.as_mut_ptr();
    // SAFETY: the frame is valid for `size` bytes in and out and outlives the call.
    let run = unsafe { test_run_raw(program, (pointer, size), (pointer, size), 1) }?;
    Ok(run.retval)
}

/// What a BPF_PROG_TEST_RUN left: the program's return value, the length of the
/// frame it wrote out, and the kernel's mean time per run (ns).
#[derive(Clone, Copy, Debug)]
pub struct TestRun {
    pub retval: u32,
    pub data_size_out: u32,
    pub duration_ns: u32,
}

/// BPF_PROG_TEST_RUN of `program` `repeat` times on `data_in`, the frame it leaves
/// written to `data_out` (which must have room for what the program may add).
pub fn test_run_into(
    program: BorrowedFd,
    data_in: &[u8],
    data_out: &mut [u8],
    repeat: u32,
) -> std::io::Result<TestRun> {
    let size = |data: usize| u32::try_from(data).expect("a frame fits in u32");
    let (size_in, size_out) = (size(data_in.len()), size(data_out.len()));
    // SAFETY: both buffers are valid for their sizes and outlive the call; the kernel
    // only reads `data_in`.
    unsafe {
        test_run_raw(
            program,
            (data_in.as_ptr().cast_mut(), size_in),
            (data_out.as_mut_ptr(), size_out),
            repeat,
        )
    }
}

/// # Safety
/// Both (pointer, size) pairs must be valid for their sizes during the call, the
/// output one for writes.
unsafe fn test_run_raw(
    program: BorrowedFd,
    (data_in, size_in): (*mut u8, u32),
    (data_out, size_out): (*mut u8, u32),
    repeat: u32,
) -> std::io::Result<TestRun> {
    /// The `test` member of `union bpf_attr` up to `batch_size`, then explicit
    /// padding to its 8-byte alignment (the kernel refuses non-zero bytes past it).
    #[repr(C)]
    #[derive(Default)]
    struct TestRunAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    const BPF_PROG_TEST_RUN: nix::libc::c_long = 10;
    let mut attr = TestRunAttr {
        prog_fd: program.as_raw_fd() as u32,
        data_size_in: size_in,
        data_size_out: size_out,
        data_in: data_in as u64,
        data_out: data_out as u64,
        repeat,
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` is the test member of bpf_attr without implicit padding; the
    // caller vouches for the buffers.
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
    Ok(TestRun {
        retval: attr.retval,
        data_size_out: attr.data_size_out,
        duration_ns: attr.duration,
    })
}

/// BPF_OBJ_GET: a file descriptor for the object pinned at `path`.
pub(crate) fn bpf_obj_get(path: &std::path::Path) -> anyhow::Result<std::os::fd::OwnedFd> {
    use anyhow::Context;
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        // The kernel refuses non-zero bytes past the last field: no implicit padding.
        _pad: u32,
    }
    const BPF_OBJ_GET: nix::libc::c_long = 7;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_OBJ_GET; the path outlives it.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }.context("BPF_OBJ_GET")?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}
