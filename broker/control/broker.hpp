// broker/control is the command surface above the flows.
//
// The Broker: the one internal command surface (style point 3), the layer above the flows. Every
// operation a user can ask for is a method here; the REST API and any other front end only parse,
// call and render. A method claims the domain's job slot, journals the job where a restart must
// finish or undo it, runs one flow and publishes the job's events.
//
// Threads: one io_context runs the Broker, every domain, every QMP client and the API. Each domain
// has one job slot: a second mutating request while a job runs gets errc::busy (409), while
// queries go through (docs/concurrency.md). Blocking work runs on the Domains' lifecycle pool.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/json/object.hpp>
#include <boost/json/value.hpp>

#include "broker/control/migration_link.hpp"
#include "broker/control/peer.hpp"
#include "broker/core/error.hpp"
#include "broker/domain/domain.hpp"
#include "broker/domain/domains.hpp"
#include "broker/domain/event_bus.hpp"
#include "broker/domain/requests.hpp"
#include "broker/flows/flows.hpp"
#include "broker/flows/recovery.hpp"
#include "broker/lifecycle/launcher.hpp"
#include "fdpass/opener.hpp"
#include "qmp/capabilities.hpp"

namespace broker {

struct BrokerConfig {
  // Where each domain's record lives (DomainsConfig::records_dir says why qbrokerd uses /run).
  std::string records_dir = "/run/qbroker/domains";
  flows::Timeouts timeouts;
  std::chrono::milliseconds start_timeout{30000};  // spawn -> capabilities negotiated
  std::chrono::milliseconds quit_timeout{3000};    // graceful quit before the kill
  std::chrono::milliseconds adopt_timeout{5000};   // QMP handshake with a re-adopted QEMU
  std::size_t qmp_max_line = 16u << 20;
  qmp::TranscriptHook transcript;                  // every QMP line of every domain (audits, tests)
  LogLimits log;                                   // each QEMU's log file and error ring
  std::chrono::milliseconds log_retention{std::chrono::hours(24)};  // logs of gone domains
  std::string save_root;  // save files are written beneath it and restored from it; empty: off
  std::size_t parallel_lifecycle = 4;  // starts and destroys of different domains at once
  std::vector<PoolShape> pool;          // the warm pool's shapes (docs/pool.md)
  // Migrations to brokers on other hosts (`to` tcp://HOST:PORT): TLS with these certificates, or
  // plain TCP when `insecure`; neither configured refuses them. The client context is made from
  // `migration` when the broker starts.
  MigrationTransport migration;
  std::shared_ptr<boost::asio::ssl::context> migration_tls_client;
};

// How a broker on another host hears that the domain it sent arrived (MigrationGateway).
struct IncomingWatch {
  explicit IncomingWatch(boost::asio::any_io_executor ex)
      : wake(ex, boost::asio::steady_timer::time_point::max()) {}
  std::optional<Result<void>> result;  // set once the incoming job ended
  boost::asio::steady_timer wake;      // cancelled then
};

struct DomainInfo {
  std::string name;
  RunState state = RunState::starting;
  std::string qemu_status;  // live query-status, when asked for and available
  uid_t uid = 0;
  pid_t pid = 0;
  std::string accel;
  std::string job;
  std::string console;  // serial console socket
  bool pooled = false;  // its QEMU came from the warm pool
  lifecycle::DomainSpec spec;
  boost::json::object devices;
  // What the domain's QEMU uses, from its cgroup, when asked for (GET with live=true, or the
  // list with ?usage=true): CPU time, and memory (memory.current, or QEMU's resident set where
  // the cgroup has no memory controller).
  struct Usage {
    std::uint64_t cpu_us = 0;
    std::uint64_t memory_bytes = 0;
    std::string memory_from;  // "cgroup" or "rss"
  };
  std::optional<Usage> usage;
  // The running job's last reported progress (0..1) and phase, when it reports any.
  std::optional<double> job_progress;
  std::string job_phase;

  boost::json::object to_json() const;
};

class Broker {
 public:
  Broker(boost::asio::any_io_executor ex, BrokerConfig config, lifecycle::Launcher& launcher,
         const fdpass::ImageRoots& roots);
  ~Broker();
  Broker(const Broker&) = delete;
  Broker& operator=(const Broker&) = delete;

  using Awaitable = boost::asio::awaitable<Result<void>>;

  // Lifecycle.
  boost::asio::awaitable<Result<DomainInfo>> create(CreateDomain request);
  // `purge_nvram`: also remove the broker's UEFI variable store of the domain, which a destroy
  // otherwise keeps for the next domain of that name.
  boost::asio::awaitable<Result<lifecycle::KillReport>> destroy(std::string name, bool graceful = false,
                                                                bool purge_nvram = false);
  // Re-adopts the domains whose records survived a restart, tears down by uid those whose QEMU
  // is gone, finishes or undoes their interrupted jobs, and resumes unfinished removals as jobs.
  using RecoveryReport = flows::RecoveryReport;
  boost::asio::awaitable<RecoveryReport> recover();
  // recover() in two steps, so the API can serve between them: load_records() enters every
  // recorded domain as adopting without asking any QEMU and returns how many; adopt_loaded()
  // reclaims orphan uids and adopts the loaded domains concurrently.
  std::size_t load_records();
  // One pass over what could not be finished (Domains::retry_stuck); qbrokerd runs it every few
  // seconds.
  boost::asio::awaitable<Domains::RetryReport> retry_stuck() { return domains_.retry_stuck(); }
  boost::asio::awaitable<RecoveryReport> adopt_loaded();
  // The warm pool (docs/pool.md). It starts filling when recover() or adopt_loaded() is done.
  WarmPool& pool() { return domains_.pool(); }

  // Queries: allowed while a job runs.
  boost::asio::awaitable<Result<DomainInfo>> info(std::string name, bool live = true);
  // `usage`: with each domain's cgroup usage, which costs a few file reads per domain.
  std::vector<DomainInfo> list(bool usage = false) const;
  // A job's progress, shown by info() and list() until the job ends.
  void note_progress(const std::string& name, double fraction, std::string_view phase);
  bool exists(const std::string& name) const { return domains_.contains(name); }

  // Run state.
  Awaitable pause(std::string name);
  Awaitable resume(std::string name);
  Awaitable shutdown(std::string name);  // ACPI power button
  Awaitable reset(std::string name);

  // Devices.
  Awaitable insert_medium(std::string name, std::string cdrom, InsertMedium medium);
  Awaitable eject_medium(std::string name, std::string cdrom, bool force);
  Awaitable add_disk(std::string name, DiskSpec disk);
  Awaitable remove_disk(std::string name, std::string id, ProgressFn progress = {});
  Awaitable add_nic(std::string name, NicSpec nic);
  Awaitable remove_nic(std::string name, std::string id, ProgressFn progress = {});
  boost::asio::awaitable<Result<VncState>> set_vnc(std::string name, VncSpec vnc);
  Awaitable remove_vnc(std::string name);

  // Save and restore (broker/flows/save.cpp, restore.cpp): jobs whose progress goes out as "job"
  // "progress" events. A save destroys the domain by uid once its file is safely written, unless
  // `keep_running`.
  Awaitable save(std::string name, SaveRequest request);
  boost::asio::awaitable<Result<DomainInfo>> restore(RestoreRequest request);
  // Asks the domain's save, restore or live update to stop; the job itself answers errc::cancelled once it has
  // undone what it did. Returns the job's kind; wrong_state when no cancellable job runs.
  boost::asio::awaitable<Result<std::string>> cancel_job(std::string name);
  // Live update (`to` "local"): the domain moves to a fresh QEMU under this broker while its
  // guest runs (flows::live_update), as a job named "live-update" that can be cancelled.
  // `to` tcp://HOST:PORT is a broker on another host, reached through its --migration-listen
  // address over TLS (MigrationLink); both QEMUs get socketpairs their brokers relay.
  // Otherwise `to` is the API socket of another broker on this host: a job named "migrate"
  // (cancellable) asks it to prepare the domain (POST /v1/migrations), streams the state to the
  // endpoint it names, waits until the domain runs there, and only then tears the domain down
  // here. A migration that fails leaves the guest running here; when the destination cannot say
  // whether it took the guest, the guest stays paused here so that it never runs twice.
  // `copy_storage` mirrors the writable disks into the destination's own images first
  // (flows::StorageCopy), at the paths in `disk_paths` or, for a disk not named, its path here.
  Awaitable migrate(std::string name, MigrateRequest request, ProgressFn progress = {});
  Awaitable live_update(std::string name);
  // The destination's half: the domain another broker describes, spawned and waiting for its
  // state on a one-time listener. Answers at once; the domain arrives (or is torn down) in the
  // background, as the job "incoming".
  struct IncomingTicket {
    std::string name;
    std::string token;
    std::string endpoint;
    std::string nbd;  // copy_storage: the NBD listener the source mirrors the disks into
  };
  // `watch`, when given, hears how the incoming job ended. `same_host`: the source is a broker on
  // this host (POST /v1/migrations), whose images copy_storage must not take as its own.
  boost::asio::awaitable<Result<IncomingTicket>> incoming(
      boost::json::value domain, bool paused, bool copy_storage, bool same_host,
      std::shared_ptr<IncomingWatch> watch = nullptr);

  // Administrators' QMP passthrough: {"execute": NAME, "arguments": {...}}. Commands that move
  // fds are refused (errc::forbidden).
  // What the configured QEMU binary is and accepts: probed over the QMP connection of a running
  // domain (qmp::probe_capabilities), once per binary identity, and cached.
  struct QemuCapabilities {
    qmp::CapabilityCache::Ptr caps;
    std::string probed_from;  // the domain whose QEMU answered
  };
  boost::asio::awaitable<Result<QemuCapabilities>> qemu_capabilities();

  boost::asio::awaitable<Result<boost::json::value>> qmp_passthrough(std::string name,
                                                                      QmpPassthrough command);

  EventBus& events() { return events_; }
  // The counters every layer records into, and what /metrics reads from the table when scraped.
  metrics::Registry& metrics() { return domains_.metrics(); }
  metrics::Live metrics_live() const { return domains_.metrics_live(); }
  const BrokerConfig& config() const { return config_; }
  flows::Context& flow_context() { return flow_ctx_; }
  lifecycle::Launcher& launcher() { return launcher_; }

 private:
  Result<std::shared_ptr<Domain>> find(const std::string& name) const { return domains_.find(name); }
  // What the broker knows of a domain without asking QEMU.
  DomainInfo describe(const Domain& d) const;
  // Its cgroup's usage, read now; none without a cgroup.
  static std::optional<DomainInfo::Usage> usage_of(const Domain& d);
  // How a job touches the domain's record.
  enum class Journal {
    none,    // the job changes nothing a restart reads back (reset, powerdown)
    after,   // saved after its last step (pause and resume: QEMU's run state is read back on
             // adoption, so a restart has nothing to undo)
    around,  // also journaled before its first step, so a restart can undo or finish it
             // (hotplug, unplug, media changes and VNC handovers, which leave nodes, fdsets and
             // netdevs half built, or a medium or listener in QEMU the record does not name)
  };
  // What a job is, as its record shows it while it runs (Domain::begin_job).
  struct JobSpec {
    std::string kind;
    std::string target;
    boost::json::object args;
    Journal journal = Journal::none;
  };
  // Claims the domain's job slot and runs a flow in it.
  template <class T, class F>
  boost::asio::awaitable<Result<T>> run_job(std::string name, JobSpec job, F flow);
  // A job that runs one device flow with `args`.
  template <class T, class... Args>
  boost::asio::awaitable<Result<T>> device_job(
      std::string name, JobSpec job,
      boost::asio::awaitable<Result<T>> (*flow)(flows::Context&, Domain&, Args...), Args... args);
  // After a job that changed devices: the fdsets no device needs go, and those QEMU keeps while the
  // VM does not run are tracked (broker/domain/fdsets.hpp).
  boost::asio::awaitable<void> settle_fdsets(Domain& d);
  // A job that is one QMP command: refused when the domain is already in `refused_in`, and
  // moving it to `after` on success (both unset for commands that leave the run state alone).
  boost::asio::awaitable<Result<void>> command_job(std::string name, std::string job,
                                                   qmp::Command command,
                                                   std::optional<RunState> refused_in,
                                                   std::optional<RunState> after);
  boost::asio::awaitable<void> resume_removal(flows::RecoveryReport::Removal removal);
  // The save flow, then (unless kept) the domain's destroy, inside the save job.
  boost::asio::awaitable<Result<void>> save_step(Domain& d, SaveRequest request, flows::CancelFlag cancel);
  boost::asio::awaitable<Result<void>> migrate_out(std::shared_ptr<Domain> d, MigrateRequest request,
                                                   flows::CancelFlag cancel);
  // After the state went: true once the destination runs the domain, false once it has given it
  // up; an error when it cannot tell.
  // Between hosts, through a link of its own to the destination's gateway ({"query": name}).
  boost::asio::awaitable<Result<bool>> arrived(std::string to, std::string name, bool paused);
  boost::asio::awaitable<Result<PeerReply>> query_remote(std::string to, std::string name);
  // The domain went to `to`: torn down here by uid, recorded as a destroy first.
  boost::asio::awaitable<void> depart(std::shared_ptr<Domain> d, std::string to);
  // After a restart, a migration whose state had all gone (flows::recover_migrate): the
  // destination is asked, and the domain departs, or runs here again, or stays paused when the
  // destination cannot say.
  boost::asio::awaitable<void> settle_interrupted_migration(std::string name,
                                                            boost::json::object args);
  // migrate_out to a broker on another host.
  boost::asio::awaitable<Result<void>> migrate_remote(std::shared_ptr<Domain> d, MigrateRequest request,
                                                      flows::CancelFlag cancel);
  // copy_storage between hosts: one more link to the destination, carrying `token`, relayed both
  // ways to a socketpair; returns the end for QEMU, and keeps the link in `links`.
  boost::asio::awaitable<Result<fdpass::UniqueFd>> open_nbd_link(
      const TcpTarget& target, const std::string& token,
      std::vector<std::shared_ptr<MigrationLink>>& links);
  // After arrived(): the domain runs there (done), or it did not go and runs here again, or the
  // guest stays paused here with the error saying why.
  boost::asio::awaitable<Result<void>> settle_arrival(Domain& d, const std::string& to,
                                                      bool was_running, Result<bool> there);
  boost::asio::awaitable<void> finish_incoming(flows::Incoming in, flows::CancelFlag cancel,
                                               std::shared_ptr<IncomingWatch> watch);
  // The cancel flag of the job running for `name`, entered for its duration.
  flows::CancelFlag enter_cancel(const std::string& name);
  void forget_cancel(const std::string& name, const flows::CancelFlag& flag);
  boost::asio::awaitable<Result<boost::json::value>> qmp_call(Domain& d, qmp::Command c);

  boost::asio::any_io_executor ex_;
  BrokerConfig config_;
  lifecycle::Launcher& launcher_;
  EventBus events_;
  Domains domains_;
  flows::Context flow_ctx_;
  flows::ResumeRemoval resume_;  // recovery hands removals to resume here, now or later
  std::vector<flows::Loaded> loaded_;  // between load_records() and adopt_loaded()
  qmp::CapabilityCache capabilities_;
  std::string capabilities_from_;
  std::map<std::string, flows::CancelFlag> cancels_;  // domain -> its cancellable job's flag
  std::map<std::string, std::pair<double, std::string>> progress_;  // domain -> its job's progress
};

}  // namespace broker
