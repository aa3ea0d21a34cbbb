// MapRegistry's bookkeeping with a fake registrar that records calls (no GPU needed).
#include "gpu/map_registry.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <utility>

namespace shotdb {
namespace gpu {
namespace {

// Keeps the registered ranges like the driver does; refuses overlaps and unknown unregisters.
class FakeRegistrar : public HostRegistrar {
 public:
  explicit FakeRegistrar(std::map<const void*, size_t>* live) : live_(live) {}
  Status Register(const void* p, size_t bytes) override {
    if (fail_next) return Status::NotSupported("fake: read-only registration unsupported");
    const uintptr_t b = reinterpret_cast<uintptr_t>(p);
    for (const auto& [q, n] : *live_) {
      const uintptr_t c = reinterpret_cast<uintptr_t>(q);
      if (b < c + n && c < b + bytes) return Status::IOError("fake: overlapping registration");
    }
    (*live_)[p] = bytes;
    return Status::OK();
  }
  void Unregister(const void* p) override {
    EXPECT_EQ(live_->erase(p), 1u) << "unregistering an unknown range";
  }
  bool fail_next = false;

 private:
  std::map<const void*, size_t>* live_;
};

TEST(MapRegistryTest, GrowsByTheNewTailOnly) {
  std::map<const void*, size_t> live;
  auto fake = std::make_unique<FakeRegistrar>(&live);
  MapRegistry reg(std::move(fake));
  static uint8_t map[1 << 16];
  ASSERT_TRUE(reg.Cover(map, 4096, sizeof(map)).ok());
  EXPECT_EQ(live.size(), 1u);
  EXPECT_TRUE(reg.Cover(map, 4096, sizeof(map)).ok());  // already covered: no call
  EXPECT_TRUE(reg.Cover(map, 2048, sizeof(map)).ok());
  EXPECT_EQ(live.size(), 1u);
  ASSERT_TRUE(reg.Cover(map, 3 * 4096, sizeof(map)).ok());
  ASSERT_EQ(live.size(), 2u);
  EXPECT_EQ(live.at(map + 4096), 2u * 4096);
  EXPECT_EQ(reg.registered_bytes(), 3u * 4096);

  EXPECT_TRUE(reg.Contains(map, 4096));
  EXPECT_TRUE(reg.Contains(map + 5000, 100));
  EXPECT_TRUE(reg.Contains(map + 3 * 4096 - 8, 8));
  EXPECT_FALSE(reg.Contains(map + 4000, 200));  // spans the two registrations
  EXPECT_FALSE(reg.Contains(map + 3 * 4096 - 8, 9));
  EXPECT_FALSE(reg.Contains(map + 3 * 4096, 1));
}

TEST(MapRegistryTest, AMovedMapReplacesTheRegistrations) {
  std::map<const void*, size_t> live;
  MapRegistry reg(std::make_unique<FakeRegistrar>(&live));
  static uint8_t a[1 << 14], b[1 << 14];
  ASSERT_TRUE(reg.Cover(a, 4096, sizeof(a)).ok());
  ASSERT_TRUE(reg.Cover(a, 8192, sizeof(a)).ok());
  ASSERT_EQ(live.size(), 2u);
  // Same base, grown reservation: LMDB remapped; the old registrations go.
  ASSERT_TRUE(reg.Cover(a, 8192, 2 * sizeof(a)).ok());
  ASSERT_EQ(live.size(), 1u);
  EXPECT_EQ(live.at(a), 8192u);
  ASSERT_TRUE(reg.Cover(b, 4096, sizeof(b)).ok());
  ASSERT_EQ(live.size(), 1u);
  EXPECT_EQ(live.count(b), 1u);
  EXPECT_FALSE(reg.Contains(a, 16));
  EXPECT_TRUE(reg.Contains(b, 16));
}

TEST(MapRegistryTest, AFailedRegistrationCoversNothingNewAndDestructionUnregisters) {
  std::map<const void*, size_t> live;
  auto fake = std::make_unique<FakeRegistrar>(&live);
  FakeRegistrar* raw = fake.get();
  {
    MapRegistry reg(std::move(fake));
    static uint8_t map[1 << 14];
    ASSERT_TRUE(reg.Cover(map, 4096, sizeof(map)).ok());
    raw->fail_next = true;
    Status s = reg.Cover(map, 8192, sizeof(map));
    EXPECT_TRUE(s.IsNotSupported()) << s.ToString();
    EXPECT_EQ(reg.registered_bytes(), 4096u);
    EXPECT_FALSE(reg.Contains(map + 4096, 1));
    EXPECT_TRUE(reg.Contains(map, 4096));
  }
  EXPECT_TRUE(live.empty());
}

}  // namespace
}  // namespace gpu
}  // namespace shotdb
