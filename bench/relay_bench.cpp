// Relay benchmark: the throughput of a live migration between two QEMUs, direct on a
// socketpair (the floor), and through the brokers' relays between hosts (MigrationLink over TCP
// on the loopback), plain (splice) and TLS 1.3, in the same run, the modes in turn each round.
//
// Each QEMU is -machine none with MIB MiB of RAM, paused. The source's RAM is a shared file
// filled from /dev/urandom beforehand, so that every page goes as it is (QEMU sends a zero page as
// a flag). The time runs from migrate-incoming at the destination to both sides reporting
// completed; the throughput is the source's ram.transferred over that time.
//
//   direct  socketpair; one end to each QEMU (getfd), migrate fd: / migrate-incoming fd:.
//   tcp     the same with the two ends of a TCP connection on the loopback: what TCP itself
//           costs here, the ceiling of any relay over it.
//   plain   a socketpair per QEMU; the brokers' ends relayed over one TCP connection, splice
//           through a pipe on each side (MigrationLink, --insecure-migration).
//   tls     the same over TLS 1.3 with certificates on both ends (openssl makes them).
//
// Usage: relay_bench [--rounds N] [--mib M] [--only MODE]   (each relay runs on an io_context
// thread of its own, as in two qbrokerd; build optimized. --only runs one mode and the floor.)
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/use_future.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "broker/control/migration_link.hpp"
#include "qemu_process.hpp"
#include "raw_qmp.hpp"
#include "support/qemu.hpp"

using Clock = std::chrono::steady_clock;
namespace asio = boost::asio;
using asio::ip::tcp;
using qbbench::RawQmp;

namespace {

[[noreturn]] void die(const std::string& what) {
  throw std::runtime_error(what);
}

void sh(const std::string& cmd) {
  if (std::system((cmd + " >/dev/null 2>&1").c_str()) != 0) die("failed: " + cmd);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

struct Dir {
  std::string path;
  Dir() {
    std::string t = "/dev/shm/qbbench.relay.XXXXXX";
    if (::mkdtemp(t.data()) == nullptr) die("mkdtemp");
    path = t;
  }
  ~Dir() { (void)!std::system(("rm -rf " + path).c_str()); }
};

// A CA and one certificate for 127.0.0.1 both brokers present.
broker::MigrationTransport make_certs(const std::string& d) {
  const std::string ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
  sh("openssl req -x509 " + ec + " -days 1 -subj /CN=bench-ca -keyout " + d + "/ca.key -out " + d +
     "/ca.pem");
  sh("openssl req " + ec + " -subj /CN=localhost -keyout " + d + "/b.key -out " + d + "/b.csr");
  sh("echo subjectAltName=IP:127.0.0.1 | dd of=" + d + "/ext");
  sh("openssl x509 -req -in " + d + "/b.csr -CA " + d + "/ca.pem -CAkey " + d +
     "/ca.key -CAcreateserial -days 1 -extfile " + d + "/ext -out " + d + "/b.pem");
  return broker::MigrationTransport{d + "/b.pem", d + "/b.key", d + "/ca.pem", false};
}

struct Qemu {
  std::unique_ptr<qbtest::QemuProcess> proc;
  std::optional<RawQmp> qmp;
};

Qemu start(const std::string& mem_object, unsigned mib, bool incoming) {
  std::vector<std::string> extra = {
      "-object", mem_object, "-machine", "memory-backend=m", "-m", std::to_string(mib) + "M", "-S"};
  if (incoming) extra.insert(extra.end(), {"-incoming", "defer"});
  Qemu q;
  q.proc = qbtest::QemuProcess::start(1, extra);
  fdpass::UniqueFd mon = std::move(q.proc->monitors[0]);
  if (!qbtest::qmp_handshake(mon.get(), std::chrono::seconds(30))) die("QMP handshake");
  q.qmp.emplace(std::move(mon));
  return q;
}

std::pair<fdpass::UniqueFd, fdpass::UniqueFd> socketpair() {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) die("socketpair");

  return {fdpass::UniqueFd(sv[0]), fdpass::UniqueFd(sv[1])};
}

// A TCP connection on the loopback, both ends.
std::pair<fdpass::UniqueFd, fdpass::UniqueFd> tcp_pair() {
  asio::io_context io;
  tcp::acceptor acceptor(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  tcp::socket client(io);
  client.connect(acceptor.local_endpoint());
  tcp::socket server = acceptor.accept();
  return {fdpass::UniqueFd(client.release()), fdpass::UniqueFd(server.release())};
}

std::uint64_t transferred(RawQmp& q) {
  std::string r = q.cmd(R"({"execute":"query-migrate"})");
  auto at = r.find("\"transferred\":");
  if (at == std::string::npos) at = r.find("\"transferred\": ");
  if (at == std::string::npos) die("no ram.transferred in " + r);
  at = r.find_first_of("0123456789", at);
  return std::stoull(r.substr(at));
}

// The relays of both brokers, each on its own io_context thread as in two qbrokerd: the
// destination's side accepts, the source's connects, and each relays its QEMU's socketpair end.
struct Relays {
  asio::io_context source_io, destination_io;
  std::thread source_thread, destination_thread;
  std::shared_ptr<broker::MigrationLink> out, in;

  Relays(std::shared_ptr<asio::ssl::context> server, std::shared_ptr<asio::ssl::context> client,
         fdpass::UniqueFd from_source, fdpass::UniqueFd to_destination) {
    tcp::acceptor acceptor(destination_io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
    const auto port = std::to_string(acceptor.local_endpoint().port());
    auto accepted = asio::co_spawn(
        destination_io,
        [&]() -> asio::awaitable<broker::Result<std::unique_ptr<broker::MigrationLink>>> {
          auto sock = co_await acceptor.async_accept(asio::use_awaitable);
          co_return co_await broker::MigrationLink::accept(std::move(sock), server,
                                                           std::chrono::seconds(10));
        },
        asio::use_future);
    auto connected = asio::co_spawn(
        source_io,
        broker::MigrationLink::connect(source_io.get_executor(), client, {"127.0.0.1", port},
                                       std::chrono::seconds(10)),
        asio::use_future);
    std::thread handshake([this] { destination_io.run(); });
    source_io.run();
    handshake.join();
    source_io.restart();
    destination_io.restart();
    auto a = accepted.get();
    auto c = connected.get();
    if (!a || !c) die("relay link: " + (a ? c.error() : a.error()).describe());
    in = std::move(*a);
    out = std::move(*c);
    asio::co_spawn(source_io, relay_out(out, std::move(from_source)), asio::detached);
    asio::co_spawn(destination_io, relay_in(in, std::move(to_destination)), asio::detached);
    source_thread = std::thread([this] { source_io.run(); });
    destination_thread = std::thread([this] { destination_io.run(); });
  }
  static asio::awaitable<void> relay_out(std::shared_ptr<broker::MigrationLink> l,
                                         fdpass::UniqueFd fd) {
    auto r = co_await l->relay_from(std::move(fd));
    if (!r) std::fprintf(stderr, "relay out: %s\n", r.error().describe().c_str());
    l->shutdown_send();  // the destination's relay sees the end
  }
  static asio::awaitable<void> relay_in(std::shared_ptr<broker::MigrationLink> l,
                                        fdpass::UniqueFd fd) {
    auto r = co_await l->relay_to(std::move(fd));
    if (!r) std::fprintf(stderr, "relay in: %s\n", r.error().describe().c_str());
  }
  ~Relays() {
    if (source_thread.joinable()) source_thread.join();
    if (destination_thread.joinable()) destination_thread.join();
  }
};

// One migration in `mode`; returns MB/s (10^6 bytes per second).
double run(const std::string& mode, const std::string& ram_file, unsigned mib,
           const broker::MigrationTransport& certs) {
  const std::string size = std::to_string(mib) + "M";
  Qemu src = start("memory-backend-file,id=m,size=" + size + ",mem-path=" + ram_file + ",share=on",
                   mib, false);
  Qemu dst = start("memory-backend-ram,id=m,size=" + size, mib, true);
  src.qmp->cmd(R"({"execute":"migrate-set-parameters","arguments":{"max-bandwidth":)" +
               std::to_string(1ull << 40) + "}}");
  std::optional<Relays> relays;
  if (mode == "direct" || mode == "tcp") {
    auto [a, b] = mode == "direct" ? socketpair() : tcp_pair();
    src.qmp->cmd(R"({"execute":"getfd","arguments":{"fdname":"m"}})", a.get());
    dst.qmp->cmd(R"({"execute":"getfd","arguments":{"fdname":"m"}})", b.get());
  } else {
    // As the brokers make them (Broker::migrate_remote, MigrationGateway).
    auto [s_qemu, s_broker] = socketpair();
    auto [d_qemu, d_broker] = socketpair();
    for (int fd : {s_qemu.get(), s_broker.get(), d_qemu.get(), d_broker.get()}) {
      broker::widen_relay_buffers(fd);
    }
    std::shared_ptr<asio::ssl::context> server, client;
    if (mode == "tls") {
      auto sc = broker::make_tls_context(certs, true);
      auto cc = broker::make_tls_context(certs, false);
      if (!sc || !cc) die("TLS context");
      server = *sc;
      client = *cc;
    }
    relays.emplace(server, client, std::move(s_broker), std::move(d_broker));
    src.qmp->cmd(R"({"execute":"getfd","arguments":{"fdname":"m"}})", s_qemu.get());
    dst.qmp->cmd(R"({"execute":"getfd","arguments":{"fdname":"m"}})", d_qemu.get());
  }
  const auto t0 = Clock::now();
  dst.qmp->cmd(R"({"execute":"migrate-incoming","arguments":{"uri":"fd:m"}})");
  src.qmp->cmd(R"({"execute":"migrate","arguments":{"uri":"fd:m"}})");
  qbbench::wait_migration(*src.qmp);
  qbbench::wait_migration(*dst.qmp);
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  const auto bytes = transferred(*src.qmp);
  if (bytes < static_cast<std::uint64_t>(mib) * 1024 * 1024 * 9 / 10) {
    die(mode + ": only " + std::to_string(bytes) + " bytes went; the RAM is not incompressible");
  }
  src.proc.reset();  // its end closes; the relays end
  return static_cast<double>(bytes) / secs / 1e6;
}

}  // namespace

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);  // as qbrokerd: a relay whose peer went gets EPIPE
  int rounds = 3;
  unsigned mib = 256;
  std::string only;  // one mode and the floor, for a profile of that mode
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--rounds" && i + 1 < argc)
      rounds = std::atoi(argv[++i]);
    else if (a == "--mib" && i + 1 < argc)
      mib = static_cast<unsigned>(std::atoi(argv[++i]));
    else if (a == "--only" && i + 1 < argc)
      only = argv[++i];
    else {
      std::fprintf(stderr, "usage: relay_bench [--rounds N] [--mib M] [--only MODE]\n");
      return 2;
    }
  }
  try {
    Dir dir;
    const std::string ram = dir.path + "/ram";
    sh("dd if=/dev/urandom of=" + ram + " bs=1M count=" + std::to_string(mib));
    auto certs = make_certs(dir.path);
    std::vector<std::string> modes = {"direct", "tcp", "plain", "tls"};
    if (!only.empty()) {
      if (std::find(modes.begin(), modes.end(), only) == modes.end()) die("no mode " + only);
      modes = {"direct", only};
      if (only == "direct") modes.pop_back();
    }
    std::map<std::string, std::vector<double>> rate;
    for (int r = 0; r < rounds; ++r) {
      for (const auto& m : modes) rate[m].push_back(run(m, ram, mib, certs));
    }
    const double floor = median(rate["direct"]);
    std::printf("relay_bench: %u MiB of incompressible RAM, %d rounds, medians (accel %s)\n", mib,
                rounds, qbtest::qemu_accel().c_str());
    for (const auto& m : modes) {
      std::printf("  %-7s %8.0f MB/s  %.2fx direct\n", m.c_str(), median(rate[m]),
                  median(rate[m]) / floor);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "relay_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
