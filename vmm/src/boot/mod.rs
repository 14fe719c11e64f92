//! Loading a guest and preparing the x86-64 boot protocols: 64-bit Linux boot
//! protocol (ELF vmlinux, bzImage) and PVH (ELF with the Xen PVH note).

pub mod cpuid;
pub mod mptable;
pub mod regs;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::{linux::LinuxBootConfigurator, pvh::PvhBootConfigurator};
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::{
    start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info},
    Elf, PvhBootCapability,
};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::*;
pub use regs::EntryMode;

/// Errors loading a guest image or writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initrd file cannot be opened or read.
    #[error("cannot read {path}: {err}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        err: std::io::Error,
    },
    /// The kernel image is neither an ELF vmlinux nor a bzImage.
    #[error("{path} is not a bootable x86-64 kernel: expected an ELF64 vmlinux (\\x7fELF) or a bzImage (\"HdrS\" at offset 0x202)")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// linux-loader rejected the image.
    #[error("cannot load kernel {path}: {err}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What the loader said.
        err: linux_loader::loader::Error,
    },
    /// The initrd does not fit in guest RAM.
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM between the kernel end ({kernel_end:#x}) and {limit:#x}; give the guest more memory with --mem")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Where the kernel ends.
        kernel_end: u64,
        /// Highest address the initrd may end at.
        limit: u64,
    },
    /// The kernel command line is too long or malformed.
    #[error("kernel command line rejected: {0} (at most {CMDLINE_MAX_SIZE} bytes including the terminating NUL)")]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing boot structures failed.
    #[error("cannot write boot structures: {0}")]
    Configure(String),
    /// Guest memory access failed.
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// The MP table cannot be built.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
}

/// A kernel image: a file, or bytes embedded in the binary (the test-guest kit).
pub enum KernelImage<'a> {
    /// A file on disk.
    File(&'a Path),
    /// An embedded image with a display name.
    Embedded(&'a str, &'a [u8]),
}

/// Where the loaded guest starts.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    /// Entry protocol.
    pub mode: EntryMode,
    /// Entry address.
    pub entry: u64,
}

/// What to boot.
pub struct BootSpec<'a> {
    /// The kernel.
    pub kernel: KernelImage<'a>,
    /// Optional initrd file.
    pub initrd: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Guest RAM size in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Prefer the 64-bit Linux boot protocol even when a PVH note is present.
    pub force_linux64: bool,
}

trait ImageSource: Read + Seek + vm_memory::ReadVolatile {}
impl<T: Read + Seek + vm_memory::ReadVolatile> ImageSource for T {}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> BootError + '_ {
    move |err| BootError::Read {
        path: path.to_path_buf(),
        err,
    }
}

/// Load the kernel, initrd and command line, write boot_params (or the PVH
/// start info), e820 map and MP table. Returns the entry point.
pub fn load<M: GuestMemoryBackend>(mem: &M, spec: &BootSpec) -> Result<BootEntry, BootError> {
    let (name, result, setup_header) = match spec.kernel {
        KernelImage::File(path) => {
            let mut f = File::open(path).map_err(read_err(path))?;
            load_kernel(mem, &mut f, path)?
        }
        KernelImage::Embedded(name, bytes) => {
            let mut c = std::io::Cursor::new(bytes);
            load_kernel(mem, &mut c, Path::new(name))?
        }
    };
    let _ = name;
    let kernel_end = result.kernel_end;

    let cmdline = Cmdline::try_from(spec.cmdline, CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Configure(e.to_string()))?;
    let cmdline_len = spec.cmdline.len() as u32 + 1;

    let initrd = match spec.initrd {
        Some(path) => Some(load_initrd(
            mem,
            path,
            kernel_end,
            spec.mem_bytes,
            setup_header.as_ref(),
        )?),
        None => None,
    };

    mem.write_slice(&mptable::build(spec.vcpus)?, GuestAddress(MPTABLE_START))?;

    let pvh = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr)
            if setup_header.is_none() && !spec.force_linux64 =>
        {
            Some(addr.0)
        }
        _ => None,
    };
    if let Some(entry) = pvh {
        write_pvh_info(mem, spec.mem_bytes, cmdline_len, initrd)?;
        return Ok(BootEntry {
            mode: EntryMode::Pvh,
            entry,
        });
    }
    write_boot_params(mem, spec.mem_bytes, cmdline_len, initrd, setup_header)?;
    // A bzImage's 64-bit entry is 0x200 past the start of the protected-mode code.
    let entry = if setup_header.is_some() {
        result.kernel_load.0 + 0x200
    } else {
        result.kernel_load.0
    };
    Ok(BootEntry {
        mode: EntryMode::Linux64,
        entry,
    })
}

type Loaded = (
    String,
    linux_loader::loader::KernelLoaderResult,
    Option<linux_loader::loader::bootparam::setup_header>,
);

fn load_kernel<M: GuestMemoryBackend, F: ImageSource>(
    mem: &M,
    f: &mut F,
    path: &Path,
) -> Result<Loaded, BootError> {
    let mut magic = [0u8; 0x206];
    let n = read_up_to(f, &mut magic).map_err(read_err(path))?;
    f.seek(SeekFrom::Start(0)).map_err(read_err(path))?;
    let load_err = |err| BootError::Load {
        path: path.to_path_buf(),
        err,
    };
    if n >= 4 && &magic[0..4] == b"\x7fELF" {
        let r = Elf::load(mem, None, f, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
        Ok((path.display().to_string(), r, None))
    } else if n >= 0x206 && &magic[0x202..0x206] == b"HdrS" {
        let r = BzImage::load(mem, None, f, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
        let hdr = r.setup_header;
        Ok((path.display().to_string(), r, hdr))
    } else {
        Err(BootError::UnknownFormat {
            path: path.to_path_buf(),
        })
    }
}

fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    kernel_end: u64,
    mem_bytes: u64,
    hdr: Option<&linux_loader::loader::bootparam::setup_header>,
) -> Result<(u64, u64), BootError> {
    let mut f = File::open(path).map_err(read_err(path))?;
    let size = f.metadata().map_err(read_err(path))?.len();
    // The initrd must sit below initrd_addr_max (2 GiB - 1 unless the header
    // says otherwise) and below the end of low RAM, page aligned, after the kernel.
    let addr_max = hdr
        .map(|h| h.initrd_addr_max as u64)
        .filter(|&m| m != 0)
        .unwrap_or(0x7fff_ffff);
    let limit = (addr_max + 1).min(mem_bytes.min(MMIO_HOLE_START));
    let too_large = BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        kernel_end,
        limit,
    };
    let start = match limit.checked_sub(size) {
        Some(s) => s & !0xfff,
        None => return Err(too_large),
    };
    if size == 0 || start < kernel_end.max(HIMEM_START) {
        return Err(too_large);
    }
    mem.read_exact_volatile_from(GuestAddress(start), &mut f, size as usize)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(err) => BootError::Read {
                path: path.to_path_buf(),
                err,
            },
            other => BootError::Memory(other),
        })?;
    Ok((start, size))
}

fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    mem_bytes: u64,
    cmdline_len: u32,
    initrd: Option<(u64, u64)>,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
) -> Result<(), BootError> {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem_bytes);
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i].addr = addr;
        params.e820_table[i].size = size;
        params.e820_table[i].r#type = type_;
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<M>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::Configure(e.to_string()))
}

fn write_pvh_info<M: GuestMemoryBackend>(
    mem: &M,
    mem_bytes: u64,
    cmdline_len: u32,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
    let _ = cmdline_len;
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem_bytes)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules_addr =
        PVH_MEMMAP_START + (memmap.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    let mut params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = modules_addr;
        params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            }],
            GuestAddress(modules_addr),
        );
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<M>(&params, mem)
        .map_err(|e| BootError::Configure(e.to_string()))
}
