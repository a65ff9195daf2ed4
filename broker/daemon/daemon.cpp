#include "broker/daemon/daemon.hpp"

#include <grp.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <functional>
#include <optional>
#include <set>
#include <variant>

#include "broker/api/server.hpp"
#include "broker/api/service.hpp"
#include "broker/core/atomic_file.hpp"
#include "broker/core/log.hpp"
#include "broker/daemon/orphan_reaper.hpp"
#include "broker/daemon/systemd.hpp"
#include "broker/domain/broker.hpp"
#include "broker/lifecycle/cgroup.hpp"
#include "broker/lifecycle/launcher.hpp"
#include "broker/lifecycle/reaper.hpp"
#include "broker/lifecycle/uid_pool.hpp"
#include "fdpass/devices.hpp"
#include "fdpass/opener.hpp"

namespace broker::daemon {
namespace asio = boost::asio;
using namespace std::chrono_literals;

namespace {

int fail(const std::string& what) {
  log::error(what);
  return 1;
}

std::string parent_of(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == 0 || slash == std::string::npos ? "/" : path.substr(0, slash);
}

// Sockets and jails of live domains must outlive a crash of the daemon: PR_SET_PDEATHSIG is not
// set on them (LauncherConfig::pdeathsig = 0), and SIGTERM leaves them running.
lifecycle::LauncherConfig launcher_config(const DaemonConfig& o) {
  lifecycle::LauncherConfig c;
  c.qemu = o.qemu;
  c.run_dir = o.run_dir;
  c.pdeathsig = 0;
  return c;
}

BrokerConfig broker_config(const DaemonConfig& o) {
  BrokerConfig c;
  c.records_dir = o.run_dir + "/domains";
  c.timeouts.qmp = o.qmp_timeout;
  c.timeouts.unplug = o.unplug_timeout;
  c.start_timeout = o.start_timeout;
  c.quit_timeout = o.quit_timeout;
  return c;
}

void raise_fd_limit() {
  rlimit r{};
  if (::getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
    r.rlim_cur = r.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &r);
  }
}

Result<lifecycle::UidRange> uid_range(const DaemonConfig& o) {
  if (const auto* user = std::get_if<UidRangeUser>(&o.uids))
    return lifecycle::UidRange::from_user(user->name, o.uid_count);
  return std::get<lifecycle::UidRange>(o.uids);
}

// Recovery first, then the socket: a client never sees a half-recovered domain list.
asio::awaitable<void> start_serving(Broker& broker, api::Server& server, fdpass::UniqueFd listener,
                                    bool* failed) {
  auto report = co_await broker.recover();
  log::info("recovered state: " + std::to_string(report.adopted.size()) + " domain(s) adopted, " +
            std::to_string(report.torn_down.size()) + " torn down, " +
            std::to_string(report.reclaimed_uids.size()) + " orphan uid(s) reclaimed");
  for (const auto& n : report.adopted) log::info("adopted domain " + n);
  for (const auto& n : report.torn_down)
    log::info("tore down domain " + n + " (its QEMU was gone)");
  if (auto ok = server.start(std::move(listener)); !ok) {
    log::error(ok.error().describe());
    *failed = true;
    co_return;
  }
  notify("READY=1\nSTATUS=serving, " + std::to_string(broker.list().size()) + " domain(s)");
  log::info("serving the API");
}

asio::awaitable<void> reap_orphans(Broker& broker, asio::steady_timer& timer, bool* stopping) {
  OrphanReaper reaper;
  while (!*stopping) {
    timer.expires_after(1s);
    auto [ec] = co_await timer.async_wait(asio::as_tuple(asio::use_awaitable));
    if (ec) break;
    std::set<pid_t> keep;
    for (const auto& d : broker.list()) {
      if (d.pid > 0) keep.insert(d.pid);
    }
    if (auto n = reaper.sweep(keep); n > 0)
      log::debug("reaped " + std::to_string(n) + " orphan(s)");
  }
}

}  // namespace

int run(const DaemonConfig& o) {
  log::set_level(o.log_level);

  if (o.xen) {
    return fail("--xen: Xen dom0 mode is not built yet; run without --xen on a KVM (or TCG) host");
  }
  if (::geteuid() != 0) {
    log::warn("not running as root: domains cannot be jailed or started, only the API is served");
  }

  // Be the reaper of everything this daemon starts (see orphan_reaper.hpp).
  if (::prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) log::warn("PR_SET_CHILD_SUBREAPER failed");
  ::signal(SIGPIPE, SIG_IGN);
  raise_fd_limit();

  auto range = uid_range(o);
  if (!range) return fail("uid range: " + range.error().describe());
  if (auto ok = range->validate(); !ok) return fail("uid range: " + ok.error().describe());

  std::optional<gid_t> admin_gid;
  if (!o.admin_group.empty()) {
    group* g = ::getgrnam(o.admin_group.c_str());
    if (g == nullptr) return fail("--admin-group: no group named '" + o.admin_group + "'");
    admin_gid = g->gr_gid;
  }

  // The state is root's alone; the run directory is traversable so that admin-group members
  // reach the API socket inside it (the socket itself is 0660 root:admin-group).
  if (auto ec = make_dirs(o.state_dir, 0700))
    return fail("cannot create " + o.state_dir + ": " + ec.message());
  if (auto ec = make_dirs(o.run_dir, 0711))
    return fail("cannot create " + o.run_dir + ": " + ec.message());
  if (o.image_roots.empty()) {
    log::warn("no --image-root: every path a request names (kernel, disk, CD) will be refused");
  }
  auto roots = fdpass::ImageRoots::open(o.image_roots);
  if (!roots) return fail("--image-root: " + roots.error().message());
  if (::access(o.qemu.c_str(), X_OK) != 0) log::warn("--qemu " + o.qemu + " is not executable");

  // The listener: the one systemd passed, or our own.
  auto passed = socket_from_systemd();
  if (!passed) return fail(passed.error().describe());
  fdpass::UniqueFd listener = std::move(*passed);
  if (listener) {
    log::info("using the socket passed by systemd (--socket is ignored)");
  } else {
    if (auto ec = make_dirs(parent_of(o.socket), 0711)) {
      return fail("cannot create the directory of " + o.socket + ": " + ec.message());
    }
    auto l = fdpass::listen_unix(o.socket, 0660, 0, admin_gid.value_or(0), 4096);
    if (!l) return fail("cannot listen on " + o.socket + ": " + l.error().message());
    listener = std::move(*l);
  }

  // The objects, in dependency order; destroyed in reverse.
  asio::io_context io(1);
  lifecycle::ForkingUidKiller killer;
  lifecycle::Reaper reaper(killer, range->base);
  lifecycle::UidPool uids(*range, o.state_dir, reaper);
  uids.load();
  // One cgroup subtree per broker, named after its uid range (stable across restarts, distinct
  // for brokers side by side, which never share a range): cgroup.kill must never reach another
  // broker's domain of the same name.
  lifecycle::CgroupManager cgroups({}, "qbroker-" + std::to_string(range->base));
  if (!cgroups.available()) log::info("cgroup v2: " + cgroups.why_unavailable());
  lifecycle::Launcher launcher(launcher_config(o), uids, cgroups, *roots);
  Broker broker(io.get_executor(), broker_config(o), launcher, *roots);
  api::Service service(broker, api::ServiceConfig{o.qemu});
  api::Server server(io.get_executor(), service, o.limits,
                     api::AccessPolicy{::geteuid(), admin_gid});

  bool stopping = false;
  bool failed = false;
  asio::signal_set signals(io, SIGTERM, SIGINT, SIGHUP);
  std::function<void(const boost::system::error_code&, int)> on_signal =
      [&](const boost::system::error_code& ec, int sig) {
        if (ec) return;
        if (sig == SIGHUP) {
          log::info("SIGHUP: reloading the configuration is not supported; restart instead");
          signals.async_wait(on_signal);
          return;
        }
        log::info(std::string(sig == SIGTERM ? "SIGTERM" : "SIGINT") +
                  ": stopping; domains keep running and are re-adopted at the next start");
        notify("STOPPING=1");
        stopping = true;
        server.stop();
      };
  signals.async_wait(on_signal);

  asio::steady_timer orphan_timer(io);
  asio::co_spawn(io, reap_orphans(broker, orphan_timer, &stopping), asio::detached);
  asio::co_spawn(io, start_serving(broker, server, std::move(listener), &failed), asio::detached);

  log::info("qbrokerd " + std::string(api::kBrokerVersion) + ": uids " +
            std::to_string(range->base + 1) + "-" + std::to_string(range->base + range->count - 1) +
            ", state " + o.state_dir + ", run " + o.run_dir);
  while (!stopping && !failed) io.run_one();

  // Answers in flight get a bounded grace; then the io_context stops with the domains running.
  orphan_timer.cancel();
  server.stop();
  auto deadline = std::chrono::steady_clock::now() + o.shutdown_grace;
  while (server.connections() > 0 && std::chrono::steady_clock::now() < deadline) {
    io.run_for(10ms);
  }
  io.stop();
  cgroups.remove_base_if_empty();
  log::info("stopped");
  return failed ? 1 : 0;
}

}  // namespace broker::daemon
