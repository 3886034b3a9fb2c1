//! Weft's transparent capture: loads the socket-level programs, attaches them to the cgroup v2
//! hierarchy, and enrolls pods by network namespace cookie.

mod cgroup;
mod error;
mod netns;
mod preflight;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use aya::maps::{HashMap, MapData, PerCpuArray, SockHash};
use aya::programs::cgroup_sock_addr::CgroupSockAddrLink;
use aya::programs::cgroup_sockopt::CgroupSockoptLink;
use aya::programs::sk_msg::SkMsgLink;
use aya::programs::sock_ops::SockOpsLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt, Program, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use redirect_common::{
    Cidr4, ClientKey, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS, OriginalDst, PodSettings, SockKey,
};

pub use cgroup::cgroup2_mount;
pub use error::RedirectError;
pub use netns::netns_cookie;
pub use preflight::{MIN_KERNEL, preflight};
pub use redirect_common::OUTBOUND_PORT;

/// The compiled programs, embedded at build time.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect"));

/// How capture is installed.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Move bytes between an application and the tunnel with sockops + sk_msg, skipping the
    /// loopback TCP stack (see `weft-bench capture`).
    pub fast_path: bool,
}

/// Destinations a pod leaves out of capture: ports (IPv4 and IPv6) and IPv4 ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exclusions {
    pub ports: Vec<u16>,
    pub cidrs_v4: Vec<(Ipv4Addr, u8)>,
}

impl Exclusions {
    fn to_settings(&self) -> Result<PodSettings, RedirectError> {
        if self.ports.len() > MAX_EXCLUDED_PORTS || self.cidrs_v4.len() > MAX_EXCLUDED_CIDRS {
            return Err(RedirectError::TooManyExclusions {
                ports: self.ports.len(),
                cidrs: self.cidrs_v4.len(),
            });
        }
        let mut settings = PodSettings {
            outbound_port: OUTBOUND_PORT,
            excluded_port_count: self.ports.len() as u8,
            excluded_cidr_count: self.cidrs_v4.len() as u8,
            _pad: [0; 4],
            excluded_ports: [0; MAX_EXCLUDED_PORTS],
            excluded_cidrs: [Cidr4::default(); MAX_EXCLUDED_CIDRS],
        };
        settings.excluded_ports[..self.ports.len()].copy_from_slice(&self.ports);
        for (slot, (addr, prefix_len)) in settings.excluded_cidrs.iter_mut().zip(&self.cidrs_v4) {
            if *prefix_len > 32 {
                return Err(RedirectError::BadCidr(format!("{addr}/{prefix_len}")));
            }
            *slot = Cidr4 {
                addr: u32::from(*addr).to_be(),
                prefix_len: *prefix_len,
                _pad: [0; 3],
            };
        }
        Ok(settings)
    }
}

/// Loaded and attached capture programs; detached when dropped.
pub struct Redirect {
    _ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, PodSettings>,
    by_client: HashMap<MapData, ClientKey, OriginalDst>,
    /// Dropping a link detaches its program.
    _links: (
        CgroupSockAddrLink,
        CgroupSockAddrLink,
        SockOpsLink,
        CgroupSockoptLink,
    ),
    /// The socket hash and, when the fast path is on, the sk_msg program attached to it.
    fast_path: (SockHash<MapData, SockKey>, Option<SkMsgLink>),
    fast_path_stats: PerCpuArray<MapData, u64>,
}

impl Redirect {
    /// Loads the programs and attaches them (bpf_link, alongside any other program) to the cgroup at `cgroup`,
    /// normally the root of the cgroup v2 hierarchy so that every pod is covered.
    pub fn install(cgroup: &Path, options: &Options) -> Result<Self, RedirectError> {
        preflight()?;
        let fast_path = u8::from(options.fast_path);
        let mut ebpf = EbpfLoader::new()
            .override_global("FAST_PATH", &fast_path, true)
            .load(PROGRAMS)
            .map_err(RedirectError::Load)?;
        let cgroup_dir = std::fs::File::open(cgroup).map_err(|source| RedirectError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        // With bpf_link the kernel always attaches in multi mode and wants no flags: `Single`
        // passes none (AllowMultiple makes link_create fail with EINVAL on 6.18).
        let mode = CgroupAttachMode::Single;

        // Load one program of the object and attach it to the cgroup; yields its link.
        macro_rules! attach {
            ($kind:ty, $name:literal) => {{
                let program: &mut $kind = program(&mut ebpf, $name)?;
                program.load().map_err(RedirectError::Program)?;
                let id = program
                    .attach(&cgroup_dir, mode)
                    .map_err(RedirectError::Program)?;
                program.take_link(id).map_err(RedirectError::Program)?
            }};
        }
        let connect4_link = attach!(CgroupSockAddr, "connect4");
        let connect6_link = attach!(CgroupSockAddr, "connect6");
        let sockops_link = attach!(SockOps, "file_original_dst");
        let getsockopt_link = attach!(CgroupSockopt, "answer_original_dst");

        let sockets: SockHash<MapData, SockKey> = SockHash::try_from(
            ebpf.take_map("SOCKETS")
                .ok_or(RedirectError::Missing("SOCKETS"))?,
        )
        .map_err(RedirectError::Map)?;
        let fast_path_stats = PerCpuArray::try_from(
            ebpf.take_map("FAST_PATH_STATS")
                .ok_or(RedirectError::Missing("FAST_PATH_STATS"))?,
        )
        .map_err(RedirectError::Map)?;
        let fast_path_link = if options.fast_path {
            let program: &mut SkMsg = program(&mut ebpf, "fast_path")?;
            program.load().map_err(RedirectError::Program)?;
            let id = program
                .attach(sockets.fd())
                .map_err(RedirectError::Program)?;
            Some(program.take_link(id).map_err(RedirectError::Program)?)
        } else {
            None
        };

        let enrolled = HashMap::try_from(
            ebpf.take_map("ENROLLED")
                .ok_or(RedirectError::Missing("ENROLLED"))?,
        )
        .map_err(RedirectError::Map)?;
        let by_client = HashMap::try_from(
            ebpf.take_map("BY_CLIENT")
                .ok_or(RedirectError::Missing("BY_CLIENT"))?,
        )
        .map_err(RedirectError::Map)?;
        Ok(Redirect {
            _ebpf: ebpf,
            enrolled,
            by_client,
            _links: (connect4_link, connect6_link, sockops_link, getsockopt_link),
            fast_path: (sockets, fast_path_link),
            fast_path_stats,
        })
    }

    /// Captures the TCP connections of the pod whose network namespace has this cookie.
    pub fn enroll(&mut self, netns_cookie: u64) -> Result<(), RedirectError> {
        self.enroll_with(netns_cookie, &Exclusions::default())
    }

    /// Like [`Redirect::enroll`], leaving the given destinations alone (a pod's opt-outs).
    /// Enrolling an enrolled pod again replaces its settings.
    pub fn enroll_with(
        &mut self,
        netns_cookie: u64,
        exclusions: &Exclusions,
    ) -> Result<(), RedirectError> {
        let settings = exclusions.to_settings()?;
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

    /// Sockets of a namespace currently on the fast path (both ends of each app-tunnel leg).
    pub fn fast_path_sockets(&self, netns_cookie: u64) -> usize {
        self.fast_path
            .0
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.netns_cookie == netns_cookie)
            .count()
    }

    /// Messages the fast path has handed straight to the peer socket, and messages it left on
    /// the normal path (no peer in the socket hash), summed over CPUs.
    pub fn fast_path_counts(&self) -> Result<(u64, u64), RedirectError> {
        let sum = |index: u32| -> Result<u64, RedirectError> {
            let values = self
                .fast_path_stats
                .get(&index, 0)
                .map_err(RedirectError::Map)?;
            Ok(values.iter().sum())
        };
        Ok((sum(0)?, sum(1)?))
    }

    /// The original destination of a captured connection, by the client's namespace and
    /// address (what the tunnel sees as the peer of the accepted socket). The same answer
    /// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` gives on that socket.
    pub fn original_destination(
        &self,
        netns_cookie: u64,
        client: SocketAddr,
    ) -> Result<Option<SocketAddr>, RedirectError> {
        let addr = match client {
            SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped().octets(),
            SocketAddr::V6(v6) => v6.ip().octets(),
        };
        let key = ClientKey {
            netns_cookie,
            addr,
            port: client.port(),
            _pad: [0; 6],
        };
        match self.by_client.get(&key, 0) {
            Ok(dst) => Ok(Some(to_socket_addr(&dst))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(RedirectError::Map(e)),
        }
    }
}

/// The program `name` of the object, as its type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, RedirectError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(RedirectError::Missing(name))?
        .try_into()
        .map_err(RedirectError::Program)
}

fn to_socket_addr(dst: &OriginalDst) -> SocketAddr {
    let v6 = Ipv6Addr::from(dst.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => SocketAddr::from((v4, dst.port)),
        None => SocketAddr::from((v6, dst.port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusions_fill_the_kernel_settings_and_refuse_too_many() {
        let e = Exclusions {
            ports: vec![5432, 6379],
            cidrs_v4: vec![("10.96.0.0".parse().unwrap(), 12)],
        };
        let s = e.to_settings().unwrap();
        assert_eq!((s.excluded_port_count, s.excluded_cidr_count), (2, 1));
        assert_eq!(&s.excluded_ports[..2], &[5432, 6379]);
        assert_eq!(s.excluded_cidrs[0].addr.to_ne_bytes(), [10, 96, 0, 0]);
        let too_many = Exclusions {
            ports: (1..=9).collect(),
            cidrs_v4: vec![],
        };
        assert!(
            too_many
                .to_settings()
                .unwrap_err()
                .to_string()
                .contains("at most 8 ports")
        );
        let bad = Exclusions {
            ports: vec![],
            cidrs_v4: vec![("10.0.0.0".parse().unwrap(), 33)],
        };
        assert!(
            bad.to_settings()
                .unwrap_err()
                .to_string()
                .contains("10.0.0.0/33")
        );
    }
}
