// RecordStore (broker/domain/record_store.hpp): a domain's record written and removed, on a tmpfs
// from the caller's thread and on a disk from the store's writer thread.
#include "broker/domain/record_store.hpp"

#include <boost/asio/io_context.hpp>
#include <catch2/catch.hpp>
#include <filesystem>
#include <string>

#include "support/asio_run.hpp"
#include "support/support.hpp"

namespace asio = boost::asio;

namespace {

// A directory of its own beneath `base`, removed at the end.
struct DirUnder {
  std::string path;
  explicit DirUnder(const std::string& base) {
    std::string tmpl = base + "/qbtest.records.XXXXXX";
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~DirUnder() { std::filesystem::remove_all(path); }
};

}  // namespace

TEST_CASE("a record store writes, reloads and removes a record on a tmpfs and on a disk",
          "[domain][records]") {
  // /dev/shm is a tmpfs on Linux; /var/tmp is on the root file system, a disk on these hosts.
  const std::string base = GENERATE(std::string("/dev/shm"), std::string("/var/tmp"));
  DirUnder dir(base);
  asio::io_context io;
  broker::RecordStore store(io.get_executor(), dir.path + "/domains");
  CHECK(store.in_memory() == (base == "/dev/shm"));

  broker::lifecycle::DomainSpec spec;
  spec.name = "rec1";
  spec.memory_mib = 96;
  broker::Domain d(spec);
  REQUIRE(qbtest::run(io, store.persist(d)));
  CHECK(std::filesystem::exists(dir.path + "/domains/rec1.json"));
  auto loaded = store.load();
  REQUIRE(loaded.size() == 1);
  REQUIRE(loaded[0].domain);
  CHECK((*loaded[0].domain)->name() == "rec1");
  CHECK((*loaded[0].domain)->spec().memory_mib == 96);
  // The temporary file of the write + rename is gone.
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path + "/domains"))
    ++files;
  CHECK(files == 1);

  REQUIRE(qbtest::run(io, store.remove("rec1")));
  CHECK_FALSE(std::filesystem::exists(dir.path + "/domains/rec1.json"));
  CHECK(store.load().empty());
}
