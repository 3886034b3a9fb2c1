//! Weft's transparent capture: loads the socket-level programs, attaches them to the cgroup v2
//! hierarchy, and enrolls pods by network namespace cookie.

mod cgroup;
mod error;
mod netns;

use std::net::{Ipv6Addr, SocketAddr};
use std::path::Path;

use aya::Ebpf;
use aya::maps::{HashMap, MapData};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use redirect_common::{OriginalDst, PodSettings};

pub use cgroup::cgroup2_mount;
pub use error::RedirectError;
pub use netns::netns_cookie;
pub use redirect_common::OUTBOUND_PORT;

/// The compiled programs, embedded at build time.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect"));

/// Loaded and attached capture programs; detached when dropped.
pub struct Redirect {
    _ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, PodSettings>,
    original: HashMap<MapData, u64, OriginalDst>,
    _links: Vec<FdLink>,
}

impl Redirect {
    /// Loads the programs and attaches them (bpf_link, alongside any other program) to the cgroup at `cgroup`,
    /// normally the root of the cgroup v2 hierarchy so that every pod is covered.
    pub fn install(cgroup: &Path) -> Result<Self, RedirectError> {
        let mut ebpf = Ebpf::load(PROGRAMS).map_err(RedirectError::Load)?;
        let cgroup_dir = std::fs::File::open(cgroup).map_err(|source| RedirectError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let program: &mut CgroupSockAddr = ebpf
            .program_mut("connect4")
            .ok_or(RedirectError::Missing("connect4"))?
            .try_into()
            .map_err(RedirectError::Program)?;
        program.load().map_err(RedirectError::Program)?;
        // With bpf_link the kernel always attaches in multi mode and wants no flags: `Single`
        // passes none (AllowMultiple makes link_create fail with EINVAL on 6.18).
        let link_id = program
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(RedirectError::Program)?;
        let link = program.take_link(link_id).map_err(RedirectError::Program)?;
        let links = vec![FdLink::try_from(link).map_err(|e| RedirectError::Link(e.to_string()))?];
        let enrolled = HashMap::try_from(
            ebpf.take_map("ENROLLED")
                .ok_or(RedirectError::Missing("ENROLLED"))?,
        )
        .map_err(RedirectError::Map)?;
        let original = HashMap::try_from(
            ebpf.take_map("ORIGINAL_DST")
                .ok_or(RedirectError::Missing("ORIGINAL_DST"))?,
        )
        .map_err(RedirectError::Map)?;
        Ok(Redirect {
            _ebpf: ebpf,
            enrolled,
            original,
            _links: links,
        })
    }

    /// Captures the TCP connections of the pod whose network namespace has this cookie.
    pub fn enroll(&mut self, netns_cookie: u64) -> Result<(), RedirectError> {
        let settings = PodSettings {
            outbound_port: OUTBOUND_PORT,
            _pad: [0; 6],
        };
        self.enrolled
            .insert(netns_cookie, settings, 0)
            .map_err(RedirectError::Map)
    }

    /// Stops capturing a pod's connections; the next connect goes straight out.
    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<(), RedirectError> {
        match self.enrolled.remove(&netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(RedirectError::Map(e)),
        }
    }

    /// The original destination of a captured socket, by its socket cookie.
    pub fn original_destination(
        &self,
        socket_cookie: u64,
    ) -> Result<Option<SocketAddr>, RedirectError> {
        match self.original.get(&socket_cookie, 0) {
            Ok(dst) => Ok(Some(to_socket_addr(&dst))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(RedirectError::Map(e)),
        }
    }
}

fn to_socket_addr(dst: &OriginalDst) -> SocketAddr {
    let v6 = Ipv6Addr::from(dst.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => SocketAddr::from((v4, dst.port)),
        None => SocketAddr::from((v6, dst.port)),
    }
}
