// Recovery after a restart: re-adopts the domains whose records survived, tears down by uid those
// whose QEMU is gone, and finishes or undoes the job each was in, with the same names and steps
// the flows use. Removals the guest had not finished are handed back to be resumed as jobs.
//
// Domains are adopted concurrently, each bounded by the adopt timeout: one stopped or stuck QEMU
// delays no other. A QEMU that is alive but does not answer is adopted as `unresponsive` and
// retried in the background until it answers, dies, or its domain is destroyed; it is never
// killed for being slow.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/awaitable.hpp>

#include "broker/domain/domain.hpp"
#include "broker/domain/domains.hpp"
#include "broker/flows/flows.hpp"

namespace broker::flows {

struct RecoveryReport {
  std::vector<std::string> adopted;
  std::vector<std::string> torn_down;
  std::vector<std::string> unresponsive;  // alive, not answering yet: retried in the background
  std::vector<uid_t> reclaimed_uids;  // recorded without a domain: killed and released
  // A removal that got past device_del before the broker died: the caller resumes it as a job
  // (device_del again, wait for the guest, free what is left). Or a migration whose state had
  // all gone: the caller asks the destination whether it runs the guest, then tears the domain
  // down here or resumes it.
  struct Removal {
    std::string domain;
    Domain::PendingJob job;
  };
};

// Called for each removal to resume, during recover() or later, when an unresponsive domain
// answers. It must outlive every domain recovery adopts.
using ResumeRemoval = std::function<void(RecoveryReport::Removal)>;

// A domain read back from its record, entered in the table as `adopting`; `alive` when its
// recorded QEMU still runs.
struct Loaded {
  std::shared_ptr<Domain> d;
  bool alive = false;
};

// Reads every record into the table at once, without asking any QEMU: the API can list the
// domains (adopting) before a single one has answered.
std::vector<Loaded> load(Domains& domains);

// Reclaims the uids no record accounts for and adopts each loaded domain, concurrently.
boost::asio::awaitable<RecoveryReport> adopt_all(Context& ctx, Domains& domains,
                                                 std::vector<Loaded> loaded,
                                                 const ResumeRemoval& resume);

// load() then adopt_all().
boost::asio::awaitable<RecoveryReport> recover(Context& ctx, Domains& domains,
                                               const ResumeRemoval& resume);

}  // namespace broker::flows
