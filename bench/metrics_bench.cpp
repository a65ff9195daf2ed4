// Metrics benchmark: what GET /metrics costs to answer with N domains (200 by default) in the
// table and every counter family busy: the Prometheus text rendered from the registry and the
// table (broker::api::metrics_outcome, as the Service runs it), then the HTTP response written
// to bytes as the server sends them. The daemon's RSS and fd count are read from /proc each time,
// as a scrape does. Prints the median, p99 and maximum of --rounds renders, and the page's size.
//
// The domains are entered in the table (Domains::reserve) with states and uids set, without
// QEMUs: rendering reads the table, not QEMU, so the figure is the same as with running guests.
//
// Usage: metrics_bench [--domains N] [--rounds N]   (no root needed; build optimized for figures)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/beast/http/write.hpp>

#include "broker/api/router.hpp"
#include "broker/domain/domains.hpp"
#include "broker/lifecycle/cgroup.hpp"
#include "broker/lifecycle/launcher.hpp"
#include "broker/lifecycle/reaper.hpp"
#include "broker/lifecycle/uid_pool.hpp"
#include "fdpass/opener.hpp"
#include "support/qemu.hpp"

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
namespace api = broker::api;

namespace {

// Never used to kill: no domain here runs anything.
constexpr uid_t kBase = 3'110'900;

struct Options {
  std::size_t domains = 200;
  std::size_t rounds = 2000;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--domains") == 0) o.domains = std::strtoul(argv[i + 1], nullptr, 10);
    if (std::strcmp(argv[i], "--rounds") == 0) o.rounds = std::strtoul(argv[i + 1], nullptr, 10);
  }
  return o;
}

// Traffic of a long-running daemon: every route answered with several statuses, every job kind
// with each outcome, every histogram with observations across its buckets.
void busy(broker::metrics::Registry& m) {
  const unsigned statuses[] = {200, 201, 400, 404, 409, 500, 503};
  for (std::size_t r = 0; r < api::routes().size(); ++r) {
    for (unsigned s : statuses) m.api_request(r, s, std::chrono::microseconds(100 * (r + 1)));
  }
  for (auto kind : broker::metrics::kJobKinds) {
    for (int o = 0; o < 3; ++o) {
      m.job_done(kind, static_cast<broker::metrics::JobOutcome>(o), std::chrono::milliseconds(o * 70));
    }
  }
  for (int i = 0; i < 1000; ++i) m.qmp_round_trip(std::chrono::microseconds(i * 37));
  m.kill_report(0, 1, 12ms);
  m.connections_accepted.inc(5000);
  m.connections_open.add(12);
}

double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(p * static_cast<double>(v.size())))];
}

}  // namespace

int main(int argc, char** argv) {
  const auto opt = parse(argc, argv);
  char dir_template[] = "/tmp/qb-metrics-bench-XXXXXX";
  const std::string dir = ::mkdtemp(dir_template);
  boost::asio::io_context io;
  broker::lifecycle::ForkingUidKiller killer;
  broker::lifecycle::Reaper reaper(killer, kBase);
  broker::lifecycle::UidPool uids({kBase, 8}, dir, reaper);
  broker::lifecycle::CgroupManager cgroups("/nonexistent");
  auto roots = fdpass::ImageRoots::open({dir});
  broker::lifecycle::LauncherConfig lc;
  lc.run_dir = dir;
  broker::lifecycle::Launcher launcher(lc, uids, cgroups, *roots);
  broker::EventBus events(io.get_executor());
  broker::DomainsConfig dc;
  dc.records_dir = dir + "/domains";
  broker::Domains domains(io.get_executor(), dc, launcher, events);

  const broker::RunState states[] = {broker::RunState::running, broker::RunState::paused,
                                     broker::RunState::running, broker::RunState::starting};
  for (std::size_t i = 0; i < opt.domains; ++i) {
    broker::lifecycle::DomainSpec spec;
    spec.name = "vm" + std::to_string(i);
    auto d = domains.reserve(spec);
    if (!d) return std::fprintf(stderr, "reserve: %s\n", d.error().describe().c_str()), 1;
    (*d)->set_state(states[i % std::size(states)]);
    (*d)->instance().uid = static_cast<uid_t>(kBase + 1 + i);
  }
  busy(domains.metrics());

  std::vector<double> us;
  us.reserve(opt.rounds);
  std::size_t bytes = 0;
  for (std::size_t i = 0; i < opt.rounds; ++i) {
    auto start = Clock::now();
    auto res = api::render(api::metrics_outcome(domains.metrics(), domains.metrics_live()), 11, true);
    std::ostringstream wire;
    wire << res;
    bytes = wire.str().size();
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - start).count());
  }
  std::printf("GET /metrics with %zu domains: %zu bytes; render+serialize median %.1f us, p99 %.1f us, "
              "max %.1f us over %zu rounds (target < 1000 us)\n",
              opt.domains, bytes, percentile(us, 0.5), percentile(us, 0.99),
              *std::max_element(us.begin(), us.end()), opt.rounds);
  std::filesystem::remove_all(dir);
  // The figure is reported, not enforced: the smoke run is a sanitized build on a shared machine.
  return 0;
}
