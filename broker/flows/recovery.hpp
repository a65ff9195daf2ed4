// Recovery after a restart: re-adopts the domains whose records survived, tears down by uid those
// whose QEMU is gone, and finishes or undoes the job each was in, with the same names and steps
// the flows use. Removals the guest had not finished are handed back to be resumed as jobs.
#pragma once

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
  std::vector<uid_t> reclaimed_uids;  // recorded without a domain: killed and released
  // Removals that got past device_del before the broker died: the caller resumes each as a job
  // (device_del again, wait for the guest, free what is left).
  struct Removal {
    std::string domain;
    Domain::PendingJob job;
  };
  std::vector<Removal> removals;
};

boost::asio::awaitable<RecoveryReport> recover(Context& ctx, Domains& domains);

}  // namespace broker::flows
