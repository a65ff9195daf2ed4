#include "broker/daemon/daemon.hpp"

#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <optional>
#include <set>
#include <variant>

#include "broker/api/server.hpp"
#include "broker/daemon/migration_gateway.hpp"
#include "broker/api/service.hpp"
#include "broker/core/atomic_file.hpp"
#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"
#include "broker/daemon/orphan_reaper.hpp"
#include "broker/daemon/systemd.hpp"
#include "broker/control/broker.hpp"
#include "broker/lifecycle/cgroup.hpp"
#include "broker/lifecycle/launcher.hpp"
#include "broker/lifecycle/reaper.hpp"
#include "broker/lifecycle/uid_pool.hpp"
#include "broker/xen/domains.hpp"
#include "broker/xen/host.hpp"
#include "broker/xen/store.hpp"
#include "broker/xen/uids.hpp"
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
lifecycle::LauncherConfig launcher_config(const DaemonConfig& o, lifecycle::QemuInstall qemu) {
  lifecycle::LauncherConfig c;
  c.qemu = std::move(qemu);
  c.run_dir = o.run_dir;
  // UEFI variable stores outlive their domains (a re-create of the name boots with them), so
  // they belong with the durable state, not on /run.
  c.firmware.nvram_dir = o.state_dir + "/nvram";
  c.pdeathsig = 0;
  c.xen_only = o.xen;
  return c;
}

BrokerConfig broker_config(const DaemonConfig& o) {
  BrokerConfig c;
  c.records_dir = o.run_dir + "/domains";
  c.timeouts.qmp = o.qmp_timeout;
  c.timeouts.unplug = o.unplug_timeout;
  c.start_timeout = o.start_timeout;
  c.quit_timeout = o.quit_timeout;
  c.log.file_bytes = o.log_max_bytes;
  c.log_retention = o.log_retention;
  c.save_root = o.save_root;
  c.parallel_lifecycle = o.parallel_starts;
  c.pool = o.pool;
  c.migration = o.migration;
  return c;
}

// A start-up failure: the message is logged as it is, and the daemon exits with status 1.
Error startup_error(std::string message) {
  return Error(make_error_code(errc::internal), std::move(message));
}

// The socket file qbrokerd bound itself (not one systemd passed), by identity: at exit it is
// removed only while the path still names it, since a second daemon may have bound it since.
struct SocketFile {
  std::string path;
  dev_t dev = 0;
  ino_t ino = 0;
};

struct Listening {
  fdpass::UniqueFd fd;
  std::optional<SocketFile> file;
};

// What the daemon takes from the host before it builds anything.
// What the Xen mode opened at start: xenstore, the hypervisor's domain list, and the uids
// libxl's convention gives the device models and the reaper.
struct XenParts {
  xen::Store store;
  std::unique_ptr<xen::DomainList> domains;
  uid_t reaper = 0;
  std::optional<uid_t> shared_uid;  // set when only xen-qemuuser-shared exists and it is allowed
};

struct Host {
  lifecycle::UidRange uids;
  std::optional<gid_t> admin_gid;
  fdpass::ImageRoots roots;
  lifecycle::QemuInstall qemu;
  fdpass::UniqueFd listener;
  std::optional<SocketFile> socket_file;
  std::optional<XenParts> xen;
  // Migrations between hosts, with TLS: the contexts as destination and as source.
  std::shared_ptr<asio::ssl::context> migration_server;
  std::shared_ptr<asio::ssl::context> migration_client;
};

// The TLS contexts, certificates loaded: a bad file stops the start, naming its option.
Result<void> migration_tls(const DaemonConfig& o, Host& h) {
  if (!o.migration.tls()) return {};
  auto server = make_tls_context(o.migration, true);
  if (!server) return startup_error("--" + server.error().field + ": " + server.error().message);
  auto client = make_tls_context(o.migration, false);
  if (!client) return startup_error("--" + client.error().field + ": " + client.error().message);
  h.migration_server = std::move(*server);
  h.migration_client = std::move(*client);
  return {};
}

// Be the reaper of everything this daemon starts (see orphan_reaper.hpp); a peer that goes
// away must not kill the daemon with SIGPIPE; every domain costs fds.
void set_up_process() {
  if (::prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) log::warn("PR_SET_CHILD_SUBREAPER failed");
  ::signal(SIGPIPE, SIG_IGN);
  rlimit r{};
  if (::getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
    r.rlim_cur = r.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &r);
  }
}

Result<lifecycle::UidRange> configured_range(const DaemonConfig& o) {
  if (const auto* user = std::get_if<UidRangeUser>(&o.uids))
    return lifecycle::UidRange::from_user(user->name, o.uid_count);
  return std::get<lifecycle::UidRange>(o.uids);
}

// The range is checked against the host's users: no uid in it may belong to anyone.
Result<lifecycle::UidRange> uid_range(const DaemonConfig& o) {
  auto range = configured_range(o);
  if (!range) return startup_error("uid range: " + range.error().describe());
  if (auto ok = range->validate(); !ok) return startup_error("uid range: " + ok.error().describe());
  // Pooled QEMUs hold uids of the range: at least one must be left for a create no shape serves.
  std::uint64_t pooled = 0;
  for (const auto& shape : o.pool) pooled += shape.count;
  if (pooled > 0 && pooled + 1 >= range->count) {
    return startup_error("--pool: the shapes keep " + std::to_string(pooled) +
                         " QEMUs, but the uid range has only " + std::to_string(range->count - 1) +
                         " uids; leave some for creates no shape serves");
  }
  return range;
}

Result<std::optional<gid_t>> admin_gid(const DaemonConfig& o) {
  if (o.admin_group.empty()) return std::optional<gid_t>();
  group* g = ::getgrnam(o.admin_group.c_str());
  if (g == nullptr) return startup_error("--admin-group: no group named '" + o.admin_group + "'");
  return std::optional<gid_t>(g->gr_gid);
}

// The state is root's alone; the run directory is traversable so that admin-group members
// reach the API socket inside it (the socket itself is 0660 root:admin-group).
Result<void> make_directories(const DaemonConfig& o) {
  if (auto ec = make_dirs(o.state_dir, 0700))
    return startup_error("cannot create " + o.state_dir + ": " + ec.message());
  if (auto ec = make_dirs(o.run_dir, 0711))
    return startup_error("cannot create " + o.run_dir + ": " + ec.message());
  return {};
}

// One --image-owner value: a uid, or a user name looked up now.
Result<uid_t> image_owner(const std::string& v) {
  uid_t uid = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), uid);
  if (ec == std::errc() && p == v.data() + v.size()) return uid;
  passwd* pw = ::getpwnam(v.c_str());
  if (pw == nullptr) return startup_error("--image-owner: no user named '" + v + "'");
  return pw->pw_uid;
}

// The users an admin-group member could be: those listed in the group and those whose primary
// group it is, as the API's peer check counts them.
std::set<uid_t> members_of(gid_t gid) {
  std::set<uid_t> uids;
  if (group* g = ::getgrgid(gid); g != nullptr) {
    for (char** m = g->gr_mem; *m != nullptr; ++m) {
      if (passwd* pw = ::getpwnam(*m); pw != nullptr) uids.insert(pw->pw_uid);
    }
  }
  ::setpwent();
  while (passwd* pw = ::getpwent()) {
    if (pw->pw_gid == gid) uids.insert(pw->pw_uid);
  }
  ::endpwent();
  return uids;
}

// Whose files a request may have opened read-write: the --image-owner list, or by default root,
// the daemon's own uid and the admin group's members, the peers the API already trusts.
Result<std::vector<uid_t>> image_owners(const DaemonConfig& o, std::optional<gid_t> admin_gid) {
  std::set<uid_t> uids;
  for (const auto& v : o.image_owners) {
    auto uid = image_owner(v);
    if (!uid) return uid.error();
    uids.insert(*uid);
  }
  if (o.image_owners.empty()) {
    uids = admin_gid ? members_of(*admin_gid) : std::set<uid_t>{};
    uids.insert({0, ::geteuid()});
  }
  return std::vector<uid_t>(uids.begin(), uids.end());
}

Result<fdpass::ImageRoots> image_roots(const DaemonConfig& o, std::optional<gid_t> admin_gid) {
  if (o.image_roots.empty()) {
    log::warn("no --image-root: every path a request names (kernel, disk, CD) will be refused");
  }
  auto owners = image_owners(o, admin_gid);
  if (!owners) return owners.error();
  fdpass::RootPolicy policy{.allow_hardlinks = o.allow_hardlinks, .write_owners = *owners};
  auto roots = fdpass::ImageRoots::open(o.image_roots, std::move(policy));
  if (!roots) return startup_error("--image-root: " + roots.error().message());
  return std::move(*roots);
}

// The listener: the one systemd passed (systemd owns its file), or our own.
Result<Listening> listener(const DaemonConfig& o, std::optional<gid_t> admin_gid) {
  auto passed = socket_from_systemd();
  if (!passed) return startup_error(passed.error().describe());
  if (*passed) {
    log::info("using the socket passed by systemd (--socket is ignored)");
    return Listening{std::move(*passed), std::nullopt};
  }
  if (auto ec = make_dirs(parent_of(o.socket), 0711)) {
    return startup_error("cannot create the directory of " + o.socket + ": " + ec.message());
  }
  auto l = fdpass::listen_unix(o.socket, 0660, 0, admin_gid.value_or(0), 4096);
  if (!l) return startup_error("cannot listen on " + o.socket + ": " + l.error().message());
  struct stat st {};
  if (::lstat(o.socket.c_str(), &st) != 0) {
    return startup_error("cannot stat " + o.socket + ": " + std::strerror(errno));
  }
  return Listening{std::move(*l), SocketFile{o.socket, st.st_dev, st.st_ino}};
}

// A stopped daemon leaves no socket file that nothing listens on behind it.
void remove_socket_file(const std::optional<SocketFile>& f) {
  if (!f) return;
  struct stat st {};
  if (::lstat(f->path.c_str(), &st) != 0) return;
  if (st.st_dev != f->dev || st.st_ino != f->ino) {
    log::info(f->path + " is another socket now; it is left in place");
    return;
  }
  if (::unlink(f->path.c_str()) != 0) {
    log::warn("cannot remove " + f->path + ": " + std::strerror(errno));
  }
}

// The QEMU domains run: checked (only root can change it), and asked once how it takes its
// QMP monitor. Without root no domain starts, so nothing is asked of it.
Result<lifecycle::QemuInstall> qemu_install(const DaemonConfig& o) {
  lifecycle::QemuInstall q{o.qemu, o.qemu_data_dirs, false};
  if (::geteuid() != 0) return q;
  if (auto ok = lifecycle::check_qemu_install(q); !ok) {
    return startup_error("--qemu, --qemu-datadir: " + ok.error().describe());
  }
  auto has_object = lifecycle::probe_monitor_object(q.binary);
  if (!has_object) return startup_error("--qemu: " + has_object.error().describe());
  q.monitor_object = *has_object;
  log::info("QEMU " + q.binary + ": QMP monitor through " +
            (q.monitor_object ? "-object monitor-qmp" : "-mon"));
  return q;
}

#define QB_TRY(var, expr) \
  auto var = (expr);      \
  if (!var) return var.error()

// The Xen mode's prerequisites, in the order a missing one is best explained: the hypervisor's
// device nodes, its control interface, xenstored, then libxl's users. The uid range becomes
// libxl's: the range base user's uid, one uid per possible domid.
Result<XenParts> open_xen(const DaemonConfig& o, lifecycle::UidRange& range) {
  struct stat st {};
  if (::stat(o.xen_dev.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return startup_error("--xen: " + o.xen_dev + " does not exist: this host runs no Xen "
                         "hypervisor (or its xen modules are not loaded); run without --xen on a "
                         "KVM (or TCG) host");
  }
  auto domains = xen::XcDomainList::open();
  if (!domains) return startup_error("--xen: " + domains.error().describe());
  auto store = xen::Store::open();
  if (!store) return startup_error("--xen: " + store.error().describe());
  xen::UserDb users;
  XenParts parts{std::move(*store), std::move(*domains), 0, std::nullopt};
  if (auto base = xen::range_base(users)) {
    range = lifecycle::UidRange{*base, xen::kFirstReservedDomid};
  } else if (auto shared = users.uid_of(xen::kSharedUser); shared && o.xen_shared_uid) {
    parts.shared_uid = *shared;
    range = lifecycle::UidRange{*shared, 2};
  } else {
    auto why = xen::device_model_uid(users, 1, o.xen_shared_uid);
    return startup_error("--xen: " + (why ? std::string("no uid range") : why.error().message));
  }
  auto reaper = xen::reaper_uid(users);
  if (!reaper && !parts.shared_uid) return startup_error("--xen: " + reaper.error().message);
  parts.reaper = reaper ? *reaper : 0;
  return parts;
}

// The host checks, in order; the first that fails ends the start-up.
Result<Host> prepare_host(const DaemonConfig& o) {
  std::optional<XenParts> xen_parts;
  lifecycle::UidRange xen_range;
  if (o.xen) {
    auto parts = open_xen(o, xen_range);
    if (!parts) return parts.error();
    xen_parts = std::move(*parts);
  }
  if (::geteuid() != 0) {
    log::warn("not running as root: domains cannot be jailed or started, only the API is served");
  }
  set_up_process();
  QB_TRY(range, xen_parts ? Result<lifecycle::UidRange>(xen_range) : uid_range(o));
  QB_TRY(gid, admin_gid(o));
  QB_TRY(dirs, make_directories(o));
  QB_TRY(roots, image_roots(o, *gid));
  QB_TRY(qemu, qemu_install(o));
  QB_TRY(listening, listener(o, *gid));
  Host h{*range, *gid, std::move(*roots), std::move(*qemu), std::move(listening->fd),
         std::move(listening->file), std::move(xen_parts), nullptr, nullptr};
  if (auto ok = migration_tls(o, h); !ok) return ok.error();
  return h;
}

#undef QB_TRY

// Set by the signal watcher and the start-up coroutine, read by the loop in serve().
struct Lifetime {
  bool stopping = false;
  bool failed = false;
};

// Adopts the domains loaded from their records and says how it went.
asio::awaitable<void> adopt_recorded(Broker& broker) {
  auto report = co_await broker.adopt_loaded();
  log::info("recovered state: " + std::to_string(report.adopted.size()) + " domain(s) adopted, " +
            std::to_string(report.torn_down.size()) + " torn down, " +
            std::to_string(report.unresponsive.size()) + " unresponsive, " +
            std::to_string(report.reclaimed_uids.size()) + " orphan uid(s) reclaimed");
  for (const auto& n : report.adopted) log::info("adopted domain " + n);
  for (const auto& n : report.torn_down)
    log::info("tore down domain " + n + " (its QEMU was gone)");
  for (const auto& n : report.unresponsive)
    log::warn("domain " + n + " is unresponsive; adopting it once its QEMU answers");
}

// The records first, then the socket, then the adoption: a client sees every recorded domain from
// its first request, listed as adopting until its QEMU has answered (at most the adopt timeout),
// and no QEMU, however slow, holds up the API.
asio::awaitable<void> start_serving(Broker& broker, api::Server& server, fdpass::UniqueFd listener,
                                    Lifetime& life) {
  const std::size_t recorded = broker.load_records();
  log::info("read " + std::to_string(recorded) + " domain record(s); adopting them");
  if (auto ok = server.start(std::move(listener)); !ok) {
    log::error(ok.error().describe());
    life.failed = true;
    co_return;
  }
  notify("READY=1\nSTATUS=serving, " + std::to_string(broker.list().size()) + " domain(s)");
  log::info("serving the API");
  co_await adopt_recorded(broker);
}

// Every few seconds: the uids quarantined because something the sweep could not kill held them,
// and the teardowns that failed, are tried again, so one stuck uid never needs a restart; and the
// logs of domains gone longer than the retention are removed.
asio::awaitable<void> retry_stuck(Broker& broker, asio::steady_timer& timer, const Lifetime& life) {
  while (!life.stopping) {
    timer.expires_after(5s);
    auto [ec] = co_await timer.async_wait(asio::as_tuple(asio::use_awaitable));
    if (ec || life.stopping) break;
    auto report = co_await broker.retry_stuck();
    for (const auto& f : report.expired_logs) log::info("removed " + f + ", past its retention");
  }
}

asio::awaitable<void> reap_orphans(Broker& broker, asio::steady_timer& timer,
                                   const Lifetime& life) {
  OrphanReaper reaper;
  while (!life.stopping) {
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

// GET /v1/xen: the uids the Xen mode runs under, and every device model it tracks.
boost::json::value xen_view(const xen::Host& xen_host, const Host& host) {
  boost::json::array models;
  for (const auto& [domid, dm] : xen_host.models()) models.push_back(xen::to_json(dm));
  boost::json::object view{{"uid_base", host.uids.base},
                           {"reaper_uid", host.xen->reaper},
                           {"device_models", std::move(models)}};
  if (host.xen->shared_uid) view["shared_uid"] = *host.xen->shared_uid;
  return view;
}

// Logs what a pass over the released domains did.
void log_released(const Result<std::vector<std::uint32_t>>& stopped, const std::vector<Error>& failed) {
  if (!stopped) log::error("Xen: " + stopped.error().describe());
  for (auto domid : stopped ? *stopped : std::vector<std::uint32_t>()) {
    log::info("Xen domain " + std::to_string(domid) + " released: its device model was killed by uid");
  }
  for (const auto& e : failed) log::error("Xen: " + e.describe());
}

// The Xen mode's teardown: a device model recorded in xenstore whose domain is gone or dying is
// killed by uid, first at start (a domain may have died while no broker watched), then after
// each @releaseDomain.
asio::awaitable<void> watch_xen(xen::Host& host, asio::posix::stream_descriptor& events,
                                const Lifetime& life) {
  std::vector<Error> failed;
  auto stopped = host.recover(&failed);
  log_released(stopped, failed);
  if (auto ok = host.watch(); !ok) {
    log::error("Xen: " + ok.error().describe() + ": released domains are not seen");
    co_return;
  }
  while (!life.stopping) {
    auto [ec] = co_await events.async_wait(asio::posix::stream_descriptor::wait_read,
                                           asio::as_tuple(asio::use_awaitable));
    if (ec) co_return;
    failed.clear();
    stopped = host.on_events(&failed);
    log_released(stopped, failed);
  }
}

// SIGTERM and SIGINT stop serving; SIGHUP is answered in the log and otherwise ignored.
asio::awaitable<void> watch_signals(asio::signal_set& signals, api::Server& server,
                                    Lifetime& life) {
  for (;;) {
    auto [ec, sig] = co_await signals.async_wait(asio::as_tuple(asio::use_awaitable));
    if (ec) co_return;
    if (sig == SIGHUP) {
      log::info("SIGHUP: reloading the configuration is not supported; restart instead");
      continue;
    }
    log::info(std::string(sig == SIGTERM ? "SIGTERM" : "SIGINT") +
              ": stopping; domains keep running and are re-adopted at the next start");
    notify("STOPPING=1");
    life.stopping = true;
    server.stop();
    co_return;
  }
}

// The warm pool's QEMUs go with the daemon: the next one would only reclaim them.
asio::awaitable<void> stop_pool(Broker& broker, bool& done) {
  co_await broker.pool().stop();
  done = true;
}

// Answers in flight get a bounded grace; then the io_context stops with the domains running.
void drain(asio::io_context& io, api::Server& server, std::chrono::milliseconds grace) {
  server.stop();
  auto deadline = std::chrono::steady_clock::now() + grace;
  while (server.connections() > 0 && std::chrono::steady_clock::now() < deadline) {
    io.run_for(10ms);
  }
  io.stop();
}

// Builds the objects on what the host gave, serves until a signal or a failed start, and
// returns the exit status.
int serve(const DaemonConfig& o, Host host) {
  // The objects, in dependency order; destroyed in reverse.
  asio::io_context io(1);
  lifecycle::ForkingUidKiller forking;
  // Under Xen each kill round takes libxl's reaper lock, so the broker and libxl's own reapers
  // never kill as one uid at once; the reaper uid is libxl's.
  xen::LockingUidKiller xen_killer(forking, o.xen_reaper_lock);
  lifecycle::UidKiller& killer = host.xen ? static_cast<lifecycle::UidKiller&>(xen_killer) : forking;
  lifecycle::Reaper reaper(killer, host.xen ? host.xen->reaper : host.uids.base);
  lifecycle::UidPool uids = host.xen && host.xen->shared_uid
                                ? lifecycle::UidPool::shared(*host.xen->shared_uid, o.state_dir, reaper)
                                : lifecycle::UidPool(host.uids, o.state_dir, reaper);
  uids.load();
  // One cgroup subtree per broker, named after its uid range (stable across restarts, distinct
  // for brokers side by side, which never share a range): cgroup.kill must never reach another
  // broker's domain of the same name.
  lifecycle::CgroupManager cgroups({}, "qbroker-" + std::to_string(host.uids.base));
  if (!cgroups.available()) log::info("cgroup v2: " + cgroups.why_unavailable());
  lifecycle::Launcher launcher(launcher_config(o, host.qemu), uids, cgroups, host.roots);
  BrokerConfig bc = broker_config(o);
  bc.migration_tls_client = host.migration_client;
  Broker broker(io.get_executor(), std::move(bc), launcher, host.roots);
  broker.metrics().uid_pool_size.set(static_cast<std::int64_t>(host.uids.count) - 1);
  xen::UserDb users;
  std::optional<xen::Host> xen_host;
  api::ServiceConfig service_config{o.qemu, {}};
  if (host.xen) {
    xen_host.emplace(host.xen->store, *host.xen->domains, launcher, uids, users,
                     xen::HostConfig{o.xen_dev, o.run_dir + "/xen", o.xen_shared_uid});
    service_config.xen_view = [&xen_host, &host] { return xen_view(*xen_host, host); };
  }
  api::Service service(broker, std::move(service_config));
  api::Server server(io.get_executor(), service, o.limits,
                     api::AccessPolicy{::geteuid(), host.admin_gid});

  std::optional<MigrationGateway> gateway;
  if (!o.migration_listen.empty()) {
    auto at = parse_listen_address(o.migration_listen);
    gateway.emplace(io.get_executor(), broker, host.migration_server);
    if (auto ok = at ? gateway->listen(*at) : Result<void>(at.error()); !ok) {
      remove_socket_file(host.socket_file);
      return fail(ok.error().message);
    }
    const auto ep = gateway->local_endpoint();
    log::info("taking migrations from other hosts on " + ep.address().to_string() + " port " +
              std::to_string(ep.port()) + (host.migration_server ? " (TLS)" : " (plain TCP)"));
  }

  Lifetime life;
  asio::signal_set signals(io, SIGTERM, SIGINT, SIGHUP);
  asio::steady_timer orphan_timer(io);
  asio::co_spawn(io, watch_signals(signals, server, life), asio::detached);
  asio::co_spawn(io, reap_orphans(broker, orphan_timer, life), asio::detached);
  asio::steady_timer retry_timer(io);
  asio::co_spawn(io, retry_stuck(broker, retry_timer, life), asio::detached);
  asio::co_spawn(io, start_serving(broker, server, std::move(host.listener), life), asio::detached);
  if (gateway) gateway->start();
  std::optional<asio::posix::stream_descriptor> xen_events;
  if (xen_host) {
    xen_events.emplace(io, ::dup(xen_host->fileno()));
    asio::co_spawn(io, watch_xen(*xen_host, *xen_events, life), asio::detached);
  }

  log::info("qbrokerd " + std::string(api::kBrokerVersion) + ": uids " +
            std::to_string(host.uids.base + 1) + "-" +
            std::to_string(host.uids.base + host.uids.count - 1) + ", state " + o.state_dir +
            ", run " + o.run_dir);
  while (!life.stopping && !life.failed) io.run_one();

  orphan_timer.cancel();
  retry_timer.cancel();
  if (gateway) gateway->stop();
  if (xen_events) xen_events->close();
  if (broker.pool().enabled()) {
    bool pool_stopped = false;
    asio::co_spawn(io, stop_pool(broker, pool_stopped), asio::detached);
    while (!pool_stopped && !io.stopped()) io.run_one();
  }
  drain(io, server, o.shutdown_grace);
  remove_socket_file(host.socket_file);
  cgroups.remove_base_if_empty();
  log::info("stopped");
  return life.failed ? 1 : 0;
}

}  // namespace

int run(const DaemonConfig& o) {
  log::set_level(o.log_level);
  log::set_format(o.log_format.value_or(log::stderr_is_journal() ? log::Format::journal
                                                                 : log::Format::text));
  auto host = prepare_host(o);
  if (!host) return fail(host.error().message);
  return serve(o, std::move(*host));
}

}  // namespace broker::daemon
