// The table of domains and the start and stop of their QEMUs: spawning on the lifecycle pool,
// the QMP session, the watch that tears a domain down by uid when its QEMU exits unasked, and
// teardown itself. It knows nothing of flows or jobs; the flows and the Broker above use it.
//
// Threads: everything here runs on the broker's io_context. Work that blocks (spawning, kill by
// uid, which polls /proc) runs on the lifecycle pool, the starts and destroys of different
// domains side by side (DomainsConfig::parallel_lifecycle), so the io_context never waits on it;
// records are written on the RecordStore's own thread.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/thread_pool.hpp>

#include "broker/core/error.hpp"
#include "broker/core/metrics.hpp"
#include "broker/domain/domain.hpp"
#include "broker/domain/event_bus.hpp"
#include "broker/domain/record_store.hpp"
#include "broker/domain/session.hpp"
#include "broker/domain/warm_pool.hpp"
#include "broker/lifecycle/launcher.hpp"

namespace broker {

struct DomainsConfig {
  // Where each domain's record lives. qbrokerd puts it in its run directory: a record describes
  // a running QEMU, which does not outlive the host, so like libvirt's /run/libvirt/qemu/*.xml it
  // belongs on the tmpfs of /run, where writing it costs no disk I/O.
  std::string records_dir = "/run/qbroker/domains";
  SessionConfig session;
  std::chrono::milliseconds quit_timeout{3000};  // graceful quit before the kill
  // QMP handshake with a QEMU re-adopted after a restart: it runs already, so it answers within
  // moments unless it is stopped or stuck (a TCG guest just continued under load can take a
  // second or two), and recovery does not wait on it for a start timeout.
  std::chrono::milliseconds adopt_timeout{5000};
  std::chrono::milliseconds qmp_timeout{10000};  // one QMP command of the broker's own
  LogLimits log;  // each QEMU's log: file size before rotation, lines kept for errors
  // The log of a domain that is gone is removed once it is this old (retry_stuck does it).
  std::chrono::milliseconds log_retention{std::chrono::hours(24)};
  // How many starts and destroys of different domains run at once (threads of the lifecycle
  // pool). A domain's own start and destroy never overlap: its job slot orders them.
  std::size_t parallel_lifecycle = 4;
  // The warm pool's shapes (docs/pool.md); empty: no pool.
  std::vector<PoolShape> pool;
};

class Domains {
 public:
  Domains(boost::asio::any_io_executor ex, DomainsConfig config, lifecycle::Launcher& launcher,
          EventBus& events);
  ~Domains();
  Domains(const Domains&) = delete;
  Domains& operator=(const Domains&) = delete;

  // The domain called `name`, or not_found naming the field "name".
  Result<std::shared_ptr<Domain>> find(const std::string& name) const;
  bool contains(const std::string& name) const { return table_.contains(name); }
  const std::map<std::string, std::shared_ptr<Domain>>& all() const { return table_; }

  // Enters a new domain under `spec.name` (already_exists when taken), holding the name while it
  // starts.
  Result<std::shared_ptr<Domain>> reserve(lifecycle::DomainSpec spec);
  // Enters a domain read back from its record.
  void insert(std::shared_ptr<Domain> d) { table_[d->name()] = std::move(d); }
  // Frees the name of a reserved domain that never started.
  void unreserve(const std::shared_ptr<Domain>& d) { table_.erase(d->name()); }
  // Spawns the domain's jailed QEMU, with the devices of `plan` on its command line when there is
  // one and `extra_args` (a restore's -incoming defer), and writes its record. On failure the
  // name is free again.
  boost::asio::awaitable<Result<void>> launch(std::shared_ptr<Domain> d, ColdPlan* plan = nullptr,
                                              std::vector<std::string> extra_args = {});
  // Gives the domain a QEMU from the warm pool when one of its shape (kept for `use`) is ready,
  // renamed for it, and writes its record: true. False when the pool has none (the caller
  // launches); an error when the handover or the record failed, after which the QEMU is gone and
  // the name free.
  boost::asio::awaitable<Result<bool>> launch_pooled(std::shared_ptr<Domain> d,
                                                     PoolUse use = PoolUse::create);
  // For a live update: spawns a second QEMU for `next`, a domain of the same name that is not in
  // the table (yet), with `extra_args`; neither the table nor the record changes. Its uid is
  // recorded as always, so a broker that dies before replace() reclaims it as an orphan.
  boost::asio::awaitable<Result<void>> spawn_beside(std::shared_ptr<Domain> next,
                                                    std::vector<std::string> extra_args);
  // `next` takes the table entry of its name, and the record.
  boost::asio::awaitable<Result<void>> replace(std::shared_ptr<Domain> next);
  // Kills a domain's QEMU by uid and releases it and its files, leaving the table and the record
  // alone: the QEMU a live update left behind, or the new one of an update that failed.
  boost::asio::awaitable<Result<lifecycle::KillReport>> retire(std::shared_ptr<Domain> d);
  // Connects to QMP and watches the QEMU: when it exits unasked, the domain is torn down by uid
  // and an "exited" event says so.
  boost::asio::awaitable<Result<void>> attach(std::shared_ptr<Domain> d);
  // The same for a QEMU that already runs, with the adopt timeout for the handshake.
  boost::asio::awaitable<Result<void>> reattach(std::shared_ptr<Domain> d);
  // Quits QEMU (when `graceful`), kills everything under the domain's uid, then drops the domain
  // and its record. A failed kill leaves the domain in the table, stopping. `asked`: the domain
  // goes because it was asked to (a destroy, or an interrupted create or destroy), so its QEMU
  // log goes too, before the record; a QEMU that exited on its own or failed to start keeps it.
  boost::asio::awaitable<Result<lifecycle::KillReport>> teardown(std::shared_ptr<Domain> d,
                                                                  bool graceful, bool asked = false);
  // For a domain read back from its record: true when its pid still names the QEMU recorded
  // (same start time), which is then held by a pidfd.
  bool still_running(Domain& d);
  // True while the domain's recorded QEMU (pid and start time) runs: neither gone nor a zombie.
  bool alive(const Domain& d) const;
  // Kills and releases the uids, and removes the cgroups, that no domain accounts for.
  boost::asio::awaitable<std::vector<uid_t>> reclaim();
  // One pass over what could not be finished: sweeps the quarantined uids again and retries the
  // teardowns that failed. Returns the uids freed and the domains torn down.
  struct RetryReport {
    std::vector<uid_t> freed_uids;
    std::vector<std::string> torn_down;
    std::vector<std::string> expired_logs;  // files removed under RUN/log
  };
  boost::asio::awaitable<RetryReport> retry_stuck();
  // Removes the fdsets QEMU kept while the VM was not running, now that it runs
  // (broker/domain/fdsets.hpp), and rewrites the record when that changed them.
  boost::asio::awaitable<void> close_held_fdsets(std::shared_ptr<Domain> d);

  RecordStore& records() { return records_; }
  WarmPool& pool() { return *pool_; }
  boost::asio::thread_pool& lifecycle_pool() { return lifecycle_; }
  EventBus& events() { return events_; }
  lifecycle::Launcher& launcher() { return launcher_; }
  const DomainsConfig& config() const { return config_; }
  metrics::Registry& metrics() { return metrics_; }
  // What /metrics reads from the table when scraped: domains by state, uids held.
  metrics::Live metrics_live() const;

 private:
  // Reads QEMU's stdout/stderr from `pipe` into the domain's log.
  void start_log(Domain& d, fdpass::UniqueFd pipe);
  void record_kill(const lifecycle::KillReport& report);
  boost::asio::awaitable<void> watch(std::shared_ptr<Domain> d);
  boost::asio::awaitable<Result<void>> connect(std::shared_ptr<Domain> d, SessionConfig session);

  boost::asio::any_io_executor ex_;
  DomainsConfig config_;
  lifecycle::Launcher& launcher_;
  EventBus& events_;
  RecordStore records_;
  boost::asio::thread_pool lifecycle_;
  std::map<std::string, std::shared_ptr<Domain>> table_;
  metrics::Registry metrics_;
  std::unique_ptr<WarmPool> pool_;
};

}  // namespace broker
