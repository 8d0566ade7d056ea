//! An event loop on epoll, and the process's signal state. Also the "time"
//! workload: CLOCK_MONOTONIC and a periodic timer.
//!
//! Before any thread starts, the process blocks SIGUSR1 (read through a
//! signalfd), SIGALRM and SIGVTALRM, then sends itself SIGALRM (pending for
//! the whole process) and SIGVTALRM (pending for the main thread only) and
//! never takes them: they must stay pending and blocked forever, and if a
//! restore lost the mask they would kill the process. SIGUSR2 gets a real
//! handler (installed with signal-hook, as nix's sigaction is unsafe) that
//! sets a flag. A helper thread writes 1 to an eventfd every 30 ms and sends
//! SIGUSR1 and SIGUSR2 to the process every 200 ms. The main thread waits in
//! epoll on a periodic CLOCK_MONOTONIC timerfd (PERIOD ms), the eventfd and
//! the signalfd, and every K timer expirations logs
//! `exp=E period_ms=P every=K efd=R efd_sent=W usr1=R usr1_sent=W usr2=R usr2_sent=W`
//! plus SigBlk, SigPnd, ShdPnd, SigCgt and SigIgn of /proc/self/status.
//!
//! Usage: `wl-events LOG [timer period ms, 50] [expirations per line, 2]`.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use nix::unistd::getpid;

use kupgrade_workloads::{die, status_field, Args, Ticker};

const TIMER: u64 = 1;
const EVENT: u64 = 2;
const SIGNAL: u64 = 3;

fn or_die<T>(what: &str, r: nix::Result<T>) -> T {
    r.unwrap_or_else(|e| die(format!("{what}: {e}")))
}

fn main() {
    let mut args = Args::new("wl-events LOG [timer period ms] [expirations per line]");
    let log = args.req();
    let period: u64 = args.opt(50);
    let per_line: u64 = args.opt(2);
    if period == 0 || per_line == 0 {
        die("period and expirations per line must be positive");
    }

    let mut blocked = SigSet::empty();
    for s in [Signal::SIGUSR1, Signal::SIGALRM, Signal::SIGVTALRM] {
        blocked.add(s);
    }
    // Threads inherit the mask: block before any of them exists.
    or_die("sigprocmask", blocked.thread_block());
    or_die("kill(SIGALRM)", kill(getpid(), Signal::SIGALRM));
    or_die(
        "pthread_kill(SIGVTALRM)",
        nix::sys::pthread::pthread_kill(nix::sys::pthread::pthread_self(), Signal::SIGVTALRM),
    );
    let usr2_flag = Arc::new(AtomicBool::new(false));
    if let Err(e) =
        signal_hook::flag::register(signal_hook::consts::SIGUSR2, Arc::clone(&usr2_flag))
    {
        die(format!("cannot install the SIGUSR2 handler: {e}"));
    }

    let mut usr1_only = SigSet::empty();
    usr1_only.add(Signal::SIGUSR1);
    let sfd = or_die(
        "signalfd",
        SignalFd::with_flags(&usr1_only, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC),
    );
    let efd = Arc::new(or_die(
        "eventfd",
        EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC),
    ));
    let tfd = or_die(
        "timerfd",
        TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        ),
    );
    let every = TimeSpec::from_duration(Duration::from_millis(period));
    or_die(
        "timerfd_settime",
        tfd.set(Expiration::Interval(every), TimerSetTimeFlags::empty()),
    );
    let epoll = or_die("epoll_create", Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC));
    or_die(
        "epoll_ctl",
        epoll.add(tfd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, TIMER)),
    );
    or_die(
        "epoll_ctl",
        epoll.add(efd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, EVENT)),
    );
    or_die(
        "epoll_ctl",
        epoll.add(sfd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, SIGNAL)),
    );

    let sent: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    {
        let (sent, efd) = (Arc::clone(&sent), Arc::clone(&efd));
        let poker = std::thread::Builder::new()
            .name("poker".into())
            .spawn(move || {
                loop {
                    // Count first, then act: the main thread can never see more than was counted.
                    sent[1].fetch_add(1, Ordering::SeqCst);
                    let _ = kill(getpid(), Signal::SIGUSR1);
                    sent[2].fetch_add(1, Ordering::SeqCst);
                    let _ = kill(getpid(), Signal::SIGUSR2);
                    for _ in 0..7 {
                        sent[0].fetch_add(1, Ordering::SeqCst);
                        let _ = efd.write(1);
                        std::thread::sleep(Duration::from_millis(30));
                    }
                }
            });
        if let Err(e) = poker {
            die(format!("cannot start a thread: {e}"));
        }
    }

    let mut out = Ticker::open_or_die(&log, None);
    let (mut exp, mut next_line, mut efd_got, mut usr1, mut usr2) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut events = [EpollEvent::empty(); 4];
    loop {
        let n = match epoll.wait(&mut events, 1000u16) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => die(format!("epoll_wait: {e}")),
        };
        for ev in &events[..n] {
            match ev.data() {
                TIMER => {
                    let mut b = [0u8; 8];
                    match nix::unistd::read(tfd.as_fd().as_raw_fd(), &mut b) {
                        Ok(8) => exp += u64::from_ne_bytes(b),
                        Ok(_) | Err(Errno::EAGAIN | Errno::EINTR) => {}
                        Err(e) => die(format!("timerfd read: {e}")),
                    }
                }
                EVENT => match efd.read() {
                    Ok(v) => efd_got += v,
                    Err(Errno::EAGAIN | Errno::EINTR) => {}
                    Err(e) => die(format!("eventfd read: {e}")),
                },
                _ => loop {
                    match sfd.read_signal() {
                        Ok(Some(_)) => usr1 += 1,
                        Ok(None) | Err(Errno::EINTR) => break,
                        Err(e) => die(format!("signalfd read: {e}")),
                    }
                },
            }
        }
        if usr2_flag.swap(false, Ordering::SeqCst) {
            usr2 += 1;
        }
        if exp >= next_line {
            next_line = exp + per_line;
            let st = |k: &str| status_field("/proc/self/status", k).unwrap_or_else(|| "?".into());
            let s = |i: usize| sent[i].load(Ordering::SeqCst);
            out.tick_or_die(&format!(
                "exp={exp} period_ms={period} every={per_line} efd={efd_got} efd_sent={} usr1={usr1} usr1_sent={} usr2={usr2} usr2_sent={} \
                 blk={} pnd={} shdpnd={} cgt={} ign={}",
                s(0),
                s(1),
                s(2),
                st("SigBlk"),
                st("SigPnd"),
                st("ShdPnd"),
                st("SigCgt"),
                st("SigIgn")
            ));
        }
    }
}
